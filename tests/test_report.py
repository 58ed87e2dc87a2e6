"""Reports built from hand-written run folders: numbers match hand computation, figures are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from empower.report import build_report, collect_runs, main_table


def _trace(task_id, passed, read, written, lengths, accepted):
    return {
        "task_id": task_id,
        "assistant": "a",
        "human": "reference",
        "events": [],
        "program": "",
        "status": "passed" if passed else "failed",
        "passed": passed,
        "tokens_read": read,
        "tokens_written": written,
        "suggestions": len(lengths),
        "accepted": accepted,
        "suggestion_tokens": lengths,
        "suggestion_chars": [4 * n for n in lengths],
        "chars_deleted_from_accepted": 0,
        "dpr": 0.0,
        "turns": len(lengths),
        "end_reason": "finished",
    }


def write_run(folder: Path, traces: list[dict], **config) -> Path:
    folder.mkdir(parents=True)
    base = {
        "assistant": "smollm2-135m",
        "policy": "model",
        "human": "reference",
        "tasks": "humaneval",
        "n_tasks": len(traces),
        "metrics_resamples": 200,
    }
    (folder / "config.json").write_text(json.dumps({**base, **config}))
    (folder / "traces.jsonl").write_text("".join(json.dumps(t) + "\n" for t in traces))
    return folder


@pytest.fixture
def grid(tmp_path) -> Path:
    """A reproduce-like folder: Empower and Base-10 runs with the reference human on 3 tasks."""
    root = tmp_path / "study"
    write_run(
        root / "eval" / "empower",
        [
            _trace("t1", True, 100, 20, [10, 10], 2),  # DPR 0.999 ** 20
            _trace("t2", True, 0, 0, [5], 0),  # DPR 1
            _trace("t3", False, 50, 50, [3, 3, 3], 1),  # DPR 0
        ],
    )
    write_run(
        root / "eval" / "base10",
        [
            _trace("t1", False, 10, 10, [10], 1),
            _trace("t2", True, 10, 200, [10, 10], 2),  # DPR 0.999 ** 101
            _trace("t3", False, 10, 10, [10], 0),
        ],
        policy="base-n",
        n=10,
    )
    (root / "grid.json").write_text(
        json.dumps(
            {
                "command": "empower reproduce --config x.yaml",
                "runs": [
                    {"run": "eval/empower", "method": "Empower", "human": "reference", "tasks": "humaneval"},
                    {"run": "eval/base10", "method": "Base-10", "human": "reference", "tasks": "humaneval"},
                ],
            }
        )
    )
    return root


def test_table_numbers_match_hand_computed(grid):
    entries, _, _ = collect_runs([grid])
    by_method = {e.method: e.summary for e in entries}
    empower, base10 = by_method["Empower"], by_method["Base-10"]
    assert empower.pass_at_1.value == pytest.approx(2 / 3)
    assert empower.acceptance.value == pytest.approx(3 / 6)
    assert empower.dpr.value == pytest.approx((0.999**20 + 1.0) / 3)
    assert base10.acceptance.value == pytest.approx(3 / 4)
    assert base10.dpr.value == pytest.approx(0.999**101 / 3)


def test_main_table_has_a_row_per_method_in_paper_order_with_cis(grid):
    entries, _, _ = collect_runs([grid])
    lines = main_table(entries).splitlines()
    assert lines[0] == "| Method | Pass@1 (reference) | Acceptance rate (reference) | DPR (reference) |"
    assert lines[2].startswith("| Empower | **0.667 [")
    assert lines[3].startswith("| Base-10 | 0.333 [")
    assert f"**{(0.999**20 + 1.0) / 3:.3f} [" in lines[2]
    assert "**0.750 [" in lines[3]  # Base-10 has the higher acceptance


def test_runs_without_grid_are_labelled_from_their_config(grid):
    (grid / "grid.json").unlink()
    methods = sorted(e.method for e in collect_runs([grid])[0])
    assert methods == ["Base-10", "smollm2-135m"]


def test_report_writes_markdown_html_and_readable_pngs(grid, tmp_path):
    out = tmp_path / "report"
    path = build_report([grid], out)
    markdown = path.read_text()
    assert "## Task set: humaneval" in markdown and "Command: `empower reproduce --config x.yaml`" in markdown
    for name in ("metrics-humaneval.png", "lengths-humaneval.png"):
        png = out / "figures" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"figures/{name}" in markdown
    html = (out / "report.html").read_text()
    assert "<table>" in html and "data:image/png;base64," in html and 'src="figures/' not in html


def test_runs_counted_with_different_tokenizers_are_flagged(grid, tmp_path):
    """Tokens and DPR mean different things under different tokenizers: the table says so."""
    assert "different tokenizers" not in build_report([grid], tmp_path / "same").read_text()
    for run, tokenizer in (("empower", "smollm2-135m"), ("base10", "qwen2.5-coder-0.5b")):
        config = grid / "eval" / run / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "count_tokenizer": tokenizer}))
    markdown = build_report([grid], tmp_path / "mixed").read_text()
    warning = next(
        line for line in markdown.splitlines() if "counted tokens with different tokenizers" in line
    )
    assert "smollm2-135m (Empower)" in warning and "qwen2.5-coder-0.5b (Base-10)" in warning


def test_paired_tests_compare_empower_with_each_baseline(grid, tmp_path):
    markdown = build_report([grid], tmp_path / "r").read_text()
    assert "| Base-10 | reference | 3 | 0.667 vs 0.333 | 1 / 0 |" in markdown


def test_sweep_section_marks_the_recommended_eta(grid, tmp_path):
    calibration = grid / "calibration"
    for eta, passed in ((0.5, [True, False]), (2.0, [True, True])):
        write_run(
            calibration / f"eta-{eta:g}",
            [_trace(f"v{i}", p, 10, 10, [4], 1) for i, p in enumerate(passed)],
            policy="threshold",
            eta=eta,
        )
    (calibration / "calibration.json").write_text(
        json.dumps(
            {
                "recommended": 2.0,
                "description": "threshold sweep",
                "runs": [{"eta": 0.5, "run": "eta-0.5"}, {"eta": 2.0, "run": "eta-2"}],
            }
        )
    )
    entries, sweeps, _ = collect_runs([grid])
    assert sorted(e.method for e in entries) == ["Base-10", "Empower"]  # sweep runs are not in the table
    out = tmp_path / "r"
    markdown = build_report([grid], out).read_text()
    assert "**Recommended eta: 2 bits**" in markdown and "| 2 (recommended) |" in markdown
    assert (out / "figures" / "eta-sweep.png").stat().st_size > 1000


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope does not exist"):
        build_report([tmp_path / "nope"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no run folder"):
        build_report([tmp_path / "empty"], tmp_path / "out")
