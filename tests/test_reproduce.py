"""The experiment grid: config validation before any work, and resuming with the tiny model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from empower.calibration import recommend_eta
from empower.cli import main
from empower.configs import config_from_dict, load_config
from empower.experiment import Ranks, check_scale
from empower.reproduce import GridMethod, ReproduceConfig, eval_done, reproduce

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(out: Path, **overrides) -> dict:
    """Everything tiny: 4 short stdlib documents, 2 training steps, 2 HumanEval tasks."""
    config = {
        "out": str(out),
        "data": {
            "corpus": "stdlib",
            "corpus_limit": 4,
            "corpus_max_chars": 1500,
            "estimator": "tiny-random",
            "progress": False,
        },
        "train": {
            "base": "tiny-random",
            "max_steps": 2,
            "batch_size": 2,
            "max_length": 128,
            "logging_steps": 1,
        },
        "eval": {
            "max_new_tokens": 4,
            "sim_max_rounds": 3,
            "sim_count_tokenizer": "tiny-random",
            "metrics_resamples": 200,
        },
        "grid": {
            "methods": ["empower", "sft-10", "base-10", "threshold"],
            "eta": 2.0,
            "task_sets": [{"tasks": "humaneval", "limit": 2}],
        },
    }
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    config = load_config(ReproduceConfig, path)
    assert config.grid.cells()


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("data", {"corpus_limt": 3}, "corpus_limt"),
        ("train", {"lora_rnk": 4}, "lora_rnk"),
        ("eval", {"sim_max_round": 3}, "sim_max_round"),
        ("grid", {"etaa": 1.0}, "etaa"),
    ],
)
def test_unknown_keys_are_refused_by_name(tmp_path, section, values, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(ReproduceConfig, tiny_config(tmp_path / "run", **{section: values}))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"grid": {"eta": -1.0}}, "grid.eta must be > 0"),
        ({"grid": {"methods": ["empower", "sft-30"]}}, "sft-30"),
        ({"train": {"max_steps": None}}, "max_steps is required"),
        ({"data": {"eta": 0.5}}, "data: eta are set by the grid"),
        ({"eval": {"sim_max_rounds": 0}}, "sim_max_rounds must be >= 1"),
        ({"grid": {"task_sets": [{"tasks": "humaneval", "humans": ["nobody"]}]}}, "nobody"),
        ({"grid": {"eta": None}}, "no calibration section"),
        ({"calibration": {"etas": [1.0]}}, "at least two positive"),
    ],
)
def test_impossible_values_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(ReproduceConfig, tiny_config(tmp_path / "run", **overrides))


def test_cli_refuses_a_bad_config_before_any_work(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path / "run", train={"lora_rnk": 4})))
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "--config", str(path)])
    assert exit_info.value.code == 2
    assert "lora_rnk" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_every_trained_method_shares_prompts_steps_and_seed(tmp_path):
    from empower.reproduce import data_config, train_config

    config = config_from_dict(ReproduceConfig, tiny_config(tmp_path / "run"))
    datas = [
        data_config(config, m, 2.0) for m in (GridMethod.EMPOWER, GridMethod.SFT_10, GridMethod.SFT_RAND)
    ]
    assert len({(d.corpus, d.corpus_limit, d.cuts_per_doc, d.seed) for d in datas}) == 1
    trains = [train_config(config, GridMethod.EMPOWER, d.out) for d in datas]
    assert {t.max_steps for t in trains} == {2} and len({t.out for t in trains}) == 3


def test_recommended_eta_is_the_best_dpr_with_ties_to_the_smaller_eta():
    from empower.metrics import Estimate

    class S:
        def __init__(self, dpr, passed):
            self.dpr, self.pass_at_1 = Estimate(dpr), Estimate(passed)

    assert recommend_eta([(0.5, S(0.2, 0.3)), (1.0, S(0.4, 0.5)), (2.0, S(0.3, 0.6))]) == 1.0
    assert recommend_eta([(4.0, S(0.4, 0.5)), (1.0, S(0.4, 0.5))]) == 1.0


def _mtimes(root: Path) -> dict[Path, float]:
    return {
        p: p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.is_file() and "report" not in p.parts and p.name not in ("grid.json", "config.json")
    }


def test_grid_runs_resumes_and_keeps_finished_stages(tmp_path):
    out = tmp_path / "run"
    broken = tiny_config(
        out, grid={"task_sets": [{"tasks": "humaneval", "tasks_path": str(tmp_path / "no.jsonl")}]}
    )
    # The evaluation stage fails (missing task file) after data and training finished: those are kept.
    with pytest.raises(FileNotFoundError, match="no.jsonl"):
        reproduce(config_from_dict(ReproduceConfig, broken))
    assert (out / "data" / "empower-eta2" / "manifest.json").is_file()
    assert (out / "models" / "sft-10" / "empower-model.json").is_file()
    trained = _mtimes(out / "models")

    report = reproduce(config_from_dict(ReproduceConfig, tiny_config(out)))
    assert _mtimes(out / "models") == trained  # not retrained
    grid = json.loads((out / "grid.json").read_text())
    assert [r["method"] for r in grid["runs"]] == ["Empower", "SFT-10", "Base-10", "Threshold"]
    assert all(eval_done(out / r["run"]) for r in grid["runs"])
    assert "| Empower |" in report.read_text()

    # An interrupted evaluation (its last episode missing) is completed; nothing else reruns.
    traces = out / "eval" / "humaneval" / "reference" / "base-10" / "traces.jsonl"
    lines = traces.read_text().splitlines(keepends=True)
    traces.write_text("".join(lines[:-1]))
    before = {p: t for p, t in _mtimes(out).items() if p.parent != traces.parent}
    reproduce(config_from_dict(ReproduceConfig, tiny_config(out)))
    assert len(traces.read_text().splitlines()) == len(lines)
    assert {p: t for p, t in _mtimes(out).items() if p.parent != traces.parent} == before


def test_sigterm_mid_training_still_records_the_time_spent(tmp_path):
    """`kill` or a scheduler's SIGTERM mid-training: grid.json keeps the time of every stage so far."""
    out = tmp_path / "run"
    config = tmp_path / "grid.yaml"
    config.write_text(
        yaml.safe_dump(tiny_config(out, train={"max_steps": 400}, grid={"methods": ["empower"]}))
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "empower", "reproduce", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpointing = out / "models" / "empower-eta2"
    deadline = time.monotonic() + 300
    while not checkpointing.is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # inside the 400 training steps
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    grid = json.loads((out / "grid.json").read_text())
    assert grid["stage_seconds"]["data"] > 0 and grid["stage_seconds"]["train"] > 0
    assert not (
        checkpointing / "empower-model.json"
    ).exists()  # training did not finish, nothing claims it did


def test_a_batch_that_cannot_split_over_the_processes_is_refused_before_any_work(tmp_path):
    config = config_from_dict(ReproduceConfig, tiny_config(tmp_path / "run", train={"batch_size": 3}))
    check_scale(config, Ranks(rank=0, world_size=1))
    with pytest.raises(ValueError, match="train: batch_size 3 does not split over 2 process"):
        check_scale(config, Ranks(rank=0, world_size=2))
    assert not (tmp_path / "run").exists()


def test_resume_with_different_shared_settings_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"data": {}, "train": {}, "eval": {}, "grid": {"eta": 2.0}}))
    with pytest.raises(ValueError, match="different data, train, eval settings"):
        reproduce(config_from_dict(ReproduceConfig, tiny_config(out)))


def test_calibration_sweeps_held_out_tasks_and_recommends_an_eta(tmp_path):
    from empower.calibration import calibrate_only

    out = tmp_path / "run"
    config = tiny_config(out, calibration={"etas": [1.0, 8.0], "size": 2})
    eta = calibrate_only(config_from_dict(ReproduceConfig, config))
    record = json.loads((out / "calibration" / "calibration.json").read_text())
    assert eta == record["recommended"] and eta in (1.0, 8.0)
    validation = [json.loads(line)["task_id"] for line in (out / "calibration" / "validation.jsonl").open()]
    assert validation == ["HumanEval/2", "HumanEval/3"]  # the grid evaluates HumanEval/0 and /1
    assert (out / "calibration" / "report" / "figures" / "eta-sweep.png").is_file()
