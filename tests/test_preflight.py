"""`empower reproduce --check`: a whole config resolved and planned before any work, offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from empower.configs import config_from_dict
from empower.preflight import measured_rates, plan, resolve
from empower.reproduce import ReproduceConfig
from lcb_fixture import write_release
from test_reproduce import tiny_config

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture
def release(tmp_path):
    return write_release(tmp_path / "lcb")


def _grid(tmp_path, release, **grid) -> ReproduceConfig:
    values = {
        "methods": ["empower", "base-10"],
        "humans": [{"human": "reference"}, {"label": "llm", "human": "llm", "human_model": "tiny-random"}],
        "task_sets": [
            {"tasks": "humaneval", "limit": 2},
            {"label": "lcb", "tasks": "livecodebench", "tasks_path": f"{release}?release=release_v6&from=2024-08-01",
             "humans": ["llm"]},
        ],
    }  # fmt: skip
    return config_from_dict(ReproduceConfig, tiny_config(tmp_path / "run", grid={**values, **grid}))


def test_a_config_that_resolves_gets_its_plan_and_nothing_runs(tmp_path, release):
    config = _grid(tmp_path, release)
    check = resolve(config)
    assert check.passed, [i for i in check.items if not i.ok]
    assert check.tasks == {"humaneval": 2, "lcb": 3} and check.references["lcb"] == 0
    assert check.documents == 4
    stages = plan(config, check, {"llm_episodes_per_min": 2.0, "reference_episodes_per_min": 20.0})
    evals = {s.name: s for s in stages if s.kind == "eval"}
    assert sorted(evals) == sorted(
        f"{m} / {h} / {t}" for m in ("Empower", "Base-10") for h, t in
        (("reference", "humaneval"), ("llm", "humaneval"), ("llm", "lcb"))
    )  # fmt: skip
    assert evals["Empower / llm / lcb"].work == "3 episodes" and evals[
        "Empower / llm / lcb"
    ].hours == pytest.approx(3 * 30 / 3600)
    assert [s.kind for s in stages].count("train") == 1
    assert not (tmp_path / "run").exists()  # nothing was written


def test_what_does_not_resolve_is_named_with_why(tmp_path, release, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    config = _grid(
        tmp_path, release,
        humans=[{"human": "reference"}, {"label": "llm", "human": "llm", "human_model": "owner/not-cached",
                                         "human_url": "http://127.0.0.1:9/v1"}],
        task_sets=[{"tasks": "humaneval", "tasks_path": str(tmp_path / "no.jsonl")},
                   {"label": "lcb", "tasks": "livecodebench", "tasks_path": f"{release}?release=release_v6"}],
    )  # fmt: skip
    check = resolve(config)
    missing = {(i.kind, i.name): i for i in check.items if not i.ok}
    assert not check.passed
    assert "HF_HUB_OFFLINE is set" in missing[("model", "owner/not-cached")].detail
    assert "no.jsonl" in missing[("tasks", f"humaneval {tmp_path / 'no.jsonl'}")].detail
    assert "has none: every task would be excluded" in missing[("cell", "reference on lcb")].detail
    server = missing[("server", "http://127.0.0.1:9/v1")]
    assert not server.fatal and "cannot list the served models" in server.detail


def test_the_measured_rates_are_read_from_the_benchmarks():
    rates = measured_rates()
    assert set(rates) == {"reference_episodes_per_min", "llm_episodes_per_min", "labeling_tokens_per_s",
                          "train_tokens_per_s"}  # fmt: skip
    assert all(rate > 0 for rate in rates.values())


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data (the paper config's corpus) is absent")
def test_the_paper_config_passes_check_given_local_copies_of_its_files(tmp_path, release):
    """configs/paper-gpu.yaml offline, with the hub's files in a local cache: the 8B and 27B models'
    configs and the release 6 files (the fixture's); its human server is not running (a warning)."""
    cache = tmp_path / "hub"
    for kind, repo, files in (
        ("models", "meta-llama--Llama-3.1-8B-Instruct", {"config.json": "{}"}),
        ("models", "google--gemma-3-27b-it", {"config.json": "{}"}),
        ("datasets", "livecodebench--code_generation_lite", None),
    ):
        folder = cache / f"{kind}--{repo}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("0123abcd")
        if files is None:
            shutil.copytree(release, folder / "snapshots" / "0123abcd")
        else:
            (folder / "snapshots" / "0123abcd").mkdir(parents=True)
            for name, text in files.items():
                (folder / "snapshots" / "0123abcd" / name).write_text(text)
    config = yaml.safe_load((ROOT / "configs" / "paper-gpu.yaml").read_text())
    config["out"] = str(tmp_path / "run")
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "COLUMNS": "300"}
    result = subprocess.run([sys.executable, "-m", "empower", "reproduce", "--config", str(path), "--check"],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "6 problems (functional, stdin)" in output and "48 episodes" in output
    assert "check passed" in output and "http://127.0.0.1:8001/v1" in output  # named, not fatal
    assert not (tmp_path / "run").exists()
