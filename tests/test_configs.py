import enum
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from empower.configs import config_command, config_from_dict, load_config, option, to_dict


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Demo:
    out: Path = option(help="where to write")
    eta: float = option(0.32, "threshold in bits")
    color: Color = option(Color.RED, "a color")
    n_items: int = option(3, "how many", flag="--n")
    verbose: bool = option(False, "talk more")

    def __post_init__(self):
        if self.eta <= 0:
            raise ValueError(f"eta must be positive, got {self.eta}")


def _app(seen, cls=None, name="run"):
    """A one-command typer app for ``cls`` (default ``Demo``) that records the configs it receives."""
    app = typer.Typer()

    @config_command(app, cls or Demo, name)
    def run(config):
        seen.append(config)

    @app.callback()
    def _root():
        pass

    return app


def test_flags_are_generated_from_fields():
    seen = []
    result = CliRunner().invoke(
        _app(seen), ["run", "--out", "x", "--eta", "4", "--color", "blue", "--n", "7"]
    )
    assert result.exit_code == 0, result.output
    assert seen == [Demo(out=Path("x"), eta=4.0, color=Color.BLUE, n_items=7)]


def test_yaml_then_flags_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("out: from-yaml\neta: 2\nn_items: 5\n")
    seen = []
    result = CliRunner().invoke(_app(seen), ["run", "--config", str(cfg), "--eta", "1.5"])
    assert result.exit_code == 0, result.output
    assert seen[0].out == Path("from-yaml") and seen[0].eta == 1.5 and seen[0].n_items == 5


def test_unknown_yaml_key_is_named(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("out: x\netaa: 2\n")
    with pytest.raises(ValueError, match="etaa"):
        load_config(Demo, cfg)


def test_missing_required_flag_is_reported():
    result = CliRunner().invoke(_app([]), ["run"])
    assert result.exit_code != 0 and "--out" in result.output


def test_roundtrip_through_dict():
    config = Demo(out=Path("o"), color=Color.BLUE)
    assert config_from_dict(Demo, to_dict(config)) == config


def test_bad_value_is_refused():
    with pytest.raises(ValueError, match="eta must be positive"):
        config_from_dict(Demo, {"out": "x", "eta": -1})


@dataclass
class Arms:
    arms: list[str] = option(help="arms", greedy=True)
    seed: int = option(0, "seed")


def test_greedy_list_takes_the_bare_values_after_its_flag():
    seen = []
    result = CliRunner().invoke(_app(seen, Arms, "create"), ["create", "--arms", "A=x", "B=y", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert seen == [Arms(arms=["A=x", "B=y"], seed=3)]


def test_bare_values_are_refused_without_a_greedy_field():
    result = CliRunner().invoke(_app([]), ["run", "--out", "x", "stray"])
    assert result.exit_code != 0
