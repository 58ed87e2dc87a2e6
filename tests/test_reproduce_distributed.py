"""`empower reproduce` under torchrun: two CPU processes (gloo) run the grid once, not twice.

Every rank trains; data building, evaluation and the records are rank 0's, and the other rank waits
for them on disk. Run: .venv/bin/pytest tests/test_reproduce_distributed.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_reproduce import _mtimes, tiny_config
from test_train_distributed import _free_port

pytestmark = pytest.mark.slow

METHODS = ["empower", "base-10"]


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def _torchrun(config: Path) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]  # fmt: skip
    return subprocess.run(
        [*launcher, "-m", "empower", "reproduce", "--config", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"},
        timeout=600,
    )


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    single = _write(root / "single.yaml", tiny_config(root / "single", grid={"methods": METHODS}))
    subprocess.run([sys.executable, "-m", "empower", "reproduce", "--config", str(single)], check=True,
                   capture_output=True, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    config = _write(root / "double.yaml", tiny_config(root / "double", grid={"methods": METHODS}))
    result = _torchrun(config)
    assert result.returncode == 0, result.stderr[-4000:]
    return root, config, result.stdout + result.stderr


def test_data_is_built_once_and_matches_one_process(grid):
    root, _, output = grid
    pairs = root / "double" / "data" / "empower-eta2" / "pairs.jsonl"
    assert pairs.read_text() == (root / "single" / "data" / "empower-eta2" / "pairs.jsonl").read_text()
    assert output.count("data Empower -> ") == 1  # rank 0's progress line; rank 1 printed none


def test_every_rank_trains(grid):
    root, _, _ = grid
    meta = json.loads((root / "double" / "models" / "empower-eta2" / "empower-model.json").read_text())
    assert meta["metrics"]["world_size"] == 2


def test_each_episode_is_played_once(grid):
    root, _, output = grid
    runs = json.loads((root / "double" / "grid.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["Empower", "Base-10"]
    for run in runs:
        folder = root / "double" / run["run"]
        tasks = [json.loads(line)["task_id"] for line in (folder / "traces.jsonl").read_text().splitlines()]
        assert len(tasks) == len(set(tasks)) == json.loads((folder / "config.json").read_text())["n_tasks"]
    assert output.count("rank 1 of 2: trains with every rank") == 1
    assert (root / "double" / "report" / "report.md").is_file()


def test_a_second_launch_resumes_and_reruns_nothing(grid):
    root, config, _ = grid
    before = _mtimes(root / "double")
    result = _torchrun(config)
    assert result.returncode == 0, result.stderr[-4000:]
    assert _mtimes(root / "double") == before
    assert (result.stdout + result.stderr).count("done already") == 4  # data, train and both evaluations


def _launch_by_hand(config: Path, port: int) -> list[subprocess.Popen]:
    """Both ranks started without torchrun's agent (as some schedulers do): nothing kills rank 1 for it."""
    processes = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "empower", "reproduce", "--config", str(config)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    return processes


def test_a_failure_on_rank_0_stops_the_waiting_rank_and_a_rerun_is_not_fooled_by_it(tmp_path):
    missing = tmp_path / "no.jsonl"
    broken = tiny_config(
        tmp_path / "run",
        grid={"methods": ["base-10"], "task_sets": [{"tasks": "humaneval", "tasks_path": str(missing)}]},
    )
    processes = _launch_by_hand(_write(tmp_path / "broken.yaml", broken), _free_port())
    try:
        outputs = [p.communicate(timeout=300) for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert processes[0].returncode != 0 and "no.jsonl" in outputs[0][1]
    assert processes[1].returncode != 0
    assert "rank 0 failed while this rank waited for eval Base-10" in outputs[1][1]
    assert "no.jsonl" in outputs[1][1]

    # Fixed and launched again: the old failure marker must not stop rank 1 this time.
    fixed = tiny_config(
        tmp_path / "run", grid={"methods": ["base-10"], "task_sets": [{"tasks": "humaneval", "limit": 2}]}
    )
    result = _torchrun(_write(tmp_path / "fixed.yaml", fixed))
    assert result.returncode == 0, result.stderr[-4000:]
    assert not (tmp_path / "run" / "rank0-failed.json").exists()
    assert (tmp_path / "run" / "report" / "report.md").is_file()
