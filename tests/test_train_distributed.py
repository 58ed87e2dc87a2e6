"""`empower train` under torchrun: two CPU processes (gloo) train the tiny model like one process does.

batch_size is the whole step's: two ranks, with 4 sequences each, must see the same tokens and reach
the same losses as one rank with all 8, and only the main rank writes the output. Run: .venv/bin/pytest tests/test_train_distributed.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from empower import models
from test_train import write_data_folder

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train(launcher: list[str], data: Path, out: Path, batch_size: int) -> tuple[dict, str]:
    args = ["-m", "empower", "train", "--data", str(data), "--out", str(out), "--base", models.TINY_MODEL,
            "--max-steps", "3", "--batch-size", str(batch_size), "--lora-dropout", "0", "--logging-steps", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, *args], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "empower-model.json").read_text()), result.stdout + result.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    write_data_folder(root / "data", models.load_tokenizer(models.TINY_MODEL))
    single, _ = _train([sys.executable], root / "data", root / "single", batch_size=8)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]  # fmt: skip
    double, output = _train(torchrun, root / "data", root / "double", batch_size=8)  # 4 per process
    return single, double, output


def test_both_ranks_train_the_same_tokens(runs):
    single, double, _ = runs
    assert double["metrics"]["world_size"] == 2
    # Tokens are gathered over ranks: a rank that did not train would halve the count.
    assert double["metrics"]["train_tokens"] == single["metrics"]["train_tokens"] > 0


def test_training_losses_match_a_single_process(runs):
    single, double, _ = runs
    assert double["metrics"]["train_loss"] == pytest.approx(single["metrics"]["train_loss"], rel=1e-5)


def test_validation_loss_is_close_to_a_single_process(runs):
    """Only close: the trainer averages per-batch means, and the batches differ (4 per rank vs 8; the
    distributed sampler also repeats a few pairs to give both ranks equal shares)."""
    single, double, _ = runs
    assert double["metrics"]["eval_loss"] == pytest.approx(single["metrics"]["eval_loss"], rel=1e-2)


def test_output_is_written_once(runs):
    *_, output = runs
    assert output.count("model saved in") == 1
