"""Golden traces: the reference-human evaluation of three policies, compared with traces saved from main.

Refactors of the generation code (the engine layer) must not change a suggestion, a decision or a
count. Each policy plays the first three HumanEval problems with the embedded SmolLM2 (greedy, fp32);
``model`` uses a LoRA adapter trained here in three steps. The traces' events, final programs and
counts must equal ``tests/data/golden/<policy>.json`` exactly (DPR to 1e-9).

Where a change is meant to alter behaviour, regenerate the files in the same commit and say why in its
message: ``EMPOWER_UPDATE_GOLDEN=1 pytest tests/test_golden.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from empower import models
from empower.env import EvalConfig, run_eval
from empower.metrics import read_traces
from empower.train import TrainConfig, train
from test_train import write_data_folder

GOLDEN = Path(__file__).parent / "data" / "golden"
UPDATE = os.environ.get("EMPOWER_UPDATE_GOLDEN") == "1"
KEPT = ("task_id", "events", "program", "status", "passed", "tokens_read", "tokens_written", "suggestions",
        "accepted", "suggestion_tokens", "turns", "end_reason")  # fmt: skip


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> str:
    """A LoRA adapter on SmolLM2, three steps on stdlib pairs (seeded: the same weights every run)."""
    folder = tmp_path_factory.mktemp("golden")
    write_data_folder(folder / "data", models.load_tokenizer(models.DEFAULT_MODEL), n_docs=4, cuts=4)
    config = TrainConfig(data=folder / "data", out=folder / "model", base=models.DEFAULT_MODEL, max_steps=3,
                         lr=2e-3, batch_size=4, val_fraction=0, seed=0)  # fmt: skip
    return str(train(config))


POLICIES = {
    "base-n": dict(assistant=models.DEFAULT_MODEL, policy="base-n", n=10),
    "threshold": dict(assistant=models.DEFAULT_MODEL, policy="threshold", eta=4.0),
    "model": dict(policy="model"),
}


@pytest.mark.integration
@pytest.mark.parametrize("policy", POLICIES)
def test_reference_human_traces_equal_the_golden_ones(policy, request, tmp_path):
    fields = dict(POLICIES[policy])
    if policy == "model":
        fields["assistant"] = request.getfixturevalue("adapter")
    config = EvalConfig(**fields, human="reference", tasks="humaneval", limit=3, max_new_tokens=16,
                        out=tmp_path / "run", sim_batch_size=3, metrics_resamples=200,
                        assistant_device="cpu")  # fmt: skip
    traces = sorted(
        read_traces(run_eval(config, progress=False) / "traces.jsonl"), key=lambda t: t["task_id"]
    )
    got = [{**{k: t[k] for k in KEPT}, "dpr": round(t["dpr"], 9)} for t in traces]
    path = GOLDEN / f"{policy}.json"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(got, indent=1) + "\n")
    expected = json.loads(path.read_text())
    for mine, theirs in zip(got, expected, strict=True):
        assert mine == theirs, f"{policy}, {mine['task_id']}: the trace differs from {path}"
