"""eta calibration on recorded runs: each eta's run folder already holds its episodes, so the sweep only
reads them, and the DPRs it compares are known by hand."""

from __future__ import annotations

import json

from empower.calibration import calibrate
from empower.configs import config_from_dict
from empower.reproduce import ReproduceConfig


def _trace(task_id: str, passed: bool, read: int, written: int) -> dict:
    return {
        "task_id": task_id,
        "passed": passed,
        "tokens_read": read,
        "tokens_written": written,
        "suggestions": 1,
        "accepted": 1,
        "suggestion_tokens": [read],
        "suggestion_chars": [4 * read],
        "chars_deleted_from_accepted": 0,
        "turns": 2,
        "end_reason": "finish",
        "status": "passed" if passed else "failed",
    }


# Per eta, both validation tasks' (passed, tokens read, tokens written); DPR = 0.999 ** (0.1 read + 0.5 written):
# eta 0.5: 0.999 ** (1 + 20) = 0.97921 on both tasks -> DPR 0.97921, Pass@1 1.0
# eta 2:   0.999 ** (2 + 5)  = 0.99302 on both tasks -> DPR 0.99302, Pass@1 1.0  (the best DPR)
# eta 8:   0.999 ** 5 = 0.99501 and a failure (0)   -> DPR 0.49750, Pass@1 0.5  (the least effort)
RECORDED = {0.5: [(True, 10, 40)] * 2, 2.0: [(True, 20, 10)] * 2, 8.0: [(True, 50, 0), (False, 50, 0)]}


def _record(tmp_path, recorded: dict) -> tuple:
    """A reproduce config whose calibration runs (one per eta) are already recorded on disk."""
    config = config_from_dict(
        ReproduceConfig,
        {
            "out": str(tmp_path / "run"),
            "eval": {"metrics_resamples": 200},
            "grid": {
                "methods": ["threshold"],
                "eta": None,
                "task_sets": [{"tasks": "humaneval", "limit": 2}],
            },
            "calibration": {"etas": list(recorded), "size": 2},
        },
    )
    # The validation split is the first two HumanEval problems no grid run uses (the grid takes 0 and 1).
    ids = ["HumanEval/2", "HumanEval/3"]
    for eta, episodes in recorded.items():
        run = config.out / "calibration" / f"eta-{eta:g}"
        run.mkdir(parents=True)
        (run / "config.json").write_text(
            json.dumps({"assistant": "recorded", "human": "reference", "tasks": "humaneval", "n_tasks": 2})
        )
        lines = [
            json.dumps(_trace(task_id, *episode)) + "\n"
            for task_id, episode in zip(ids, episodes, strict=True)
        ]
        (run / "traces.jsonl").write_text("".join(lines))
        (run / "summary.json").write_text("{}")
    return config, ids


def test_calibration_recommends_the_eta_of_the_best_recorded_dpr(tmp_path):
    config, ids = _record(tmp_path, RECORDED)
    recorded = {p: p.stat().st_mtime_ns for p in (config.out / "calibration").rglob("traces.jsonl")}

    assert calibrate(config) == 2.0
    saved = json.loads((config.out / "calibration" / "calibration.json").read_text())
    assert saved["recommended"] == 2.0 and [r["eta"] for r in saved["runs"]] == [0.5, 2.0, 8.0]
    assert {p: p.stat().st_mtime_ns for p in recorded} == recorded  # read, not played again
    validation = (config.out / "calibration" / "validation.jsonl").read_text().splitlines()
    assert [json.loads(line)["task_id"] for line in validation] == ids


def test_a_tie_in_dpr_and_pass_rate_goes_to_the_smaller_eta(tmp_path):
    # eta 1 and eta 4: the same (passed, read, written) on both tasks, so the same DPR (0.999 ** 7 = 0.99302)
    # and Pass@1 (1.0); eta 0.25 trails (0.999 ** 21). The smaller of the tied etas suggests less.
    tied = {4.0: [(True, 20, 10)] * 2, 0.25: [(True, 10, 40)] * 2, 1.0: [(True, 20, 10)] * 2}
    config, _ = _record(tmp_path, tied)
    assert calibrate(config) == 1.0
