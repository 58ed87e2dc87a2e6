"""Metrics are pure functions of trace lines: each property tested directly on hand-made traces."""

import json
import math

import pytest

from empower.metrics import (
    MetricsConfig,
    acceptance_rate,
    compare_episodes,
    compare_runs,
    discounted_pass,
    episode_metrics,
    mcnemar_exact,
    read_traces,
    summarize_episodes,
    summarize_run,
    summary_table,
    write_summary,
)


def _trace(task_id="t0", passed=True, read=0, written=0, shown=0, accepted=0, lengths=(), chars=None):
    return {
        "task_id": task_id,
        "passed": passed,
        "tokens_read": read,
        "tokens_written": written,
        "suggestions": shown,
        "accepted": accepted,
        "suggestion_tokens": list(lengths),
        "suggestion_chars": list(chars if chars is not None else [4 * n for n in lengths]),
        "chars_deleted_from_accepted": 0,
        "turns": 3,
        "end_reason": "finish",
        "status": "passed" if passed else "failed",
    }


def _episodes(rows, config=None):
    return [episode_metrics(_trace(f"t{i}", **row), config) for i, row in enumerate(rows)]


def test_dpr_is_zero_for_a_failed_program_whatever_the_effort():
    assert discounted_pass(False, 0, 0) == 0.0


def test_dpr_of_effortless_success_is_one():
    assert discounted_pass(True, 0, 0) == 1.0


def test_dpr_matches_the_paper_formula():
    assert discounted_pass(True, 100, 20) == pytest.approx(0.999 ** (0.1 * 100 + 0.5 * 20))


def test_dpr_weights_are_configurable():
    config = MetricsConfig(dpr_gamma=0.5, dpr_alpha=1.0, dpr_beta=2.0)
    assert discounted_pass(True, 1, 1, config) == pytest.approx(0.5**3)


def test_writing_a_token_costs_more_than_reading_one():
    assert discounted_pass(True, 10, 0) > discounted_pass(True, 0, 10)


@pytest.mark.parametrize("field,value", [("dpr_gamma", 0.0), ("dpr_gamma", 1.5), ("dpr_alpha", -1.0)])
def test_invalid_dpr_weight_is_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        MetricsConfig(**{field: value})


def test_acceptance_is_undefined_without_suggestions():
    assert acceptance_rate(0, 0) is None


def test_acceptance_rejects_more_accepted_than_shown():
    with pytest.raises(ValueError, match="accepted"):
        acceptance_rate(3, 2)


def test_run_acceptance_pools_suggestions_over_tasks():
    summary = summarize_episodes(_episodes([dict(shown=1, accepted=1), dict(shown=3, accepted=0)]))
    assert summary.acceptance.value == pytest.approx(0.25)


def test_run_acceptance_ignores_tasks_with_no_suggestion():
    summary = summarize_episodes(_episodes([dict(shown=2, accepted=1), dict(shown=0, accepted=0)]))
    assert summary.acceptance.value == pytest.approx(0.5)


def test_run_without_any_suggestion_has_no_acceptance():
    assert summarize_episodes(_episodes([dict(), dict()])).acceptance is None


def test_pass_at_1_is_the_share_of_passing_tasks():
    summary = summarize_episodes(
        _episodes([dict(passed=True), dict(passed=False), dict(passed=False), dict(passed=True)])
    )
    assert summary.pass_at_1.value == 0.5


def test_confidence_interval_contains_the_estimate():
    rows = [dict(passed=i % 3 == 0, read=10 * i, written=i) for i in range(30)]
    summary = summarize_episodes(_episodes(rows))
    for estimate in (summary.pass_at_1, summary.dpr, summary.tokens_read):
        assert estimate.low <= estimate.value <= estimate.high
        assert estimate.low < estimate.high


def test_bootstrap_is_reproducible_with_a_seed():
    rows = [dict(passed=i % 2 == 0, read=i) for i in range(20)]
    assert summarize_episodes(_episodes(rows)).dpr == summarize_episodes(_episodes(rows)).dpr


def test_single_task_has_no_interval():
    estimate = summarize_episodes(_episodes([dict()])).pass_at_1
    assert (estimate.value, estimate.low, estimate.high) == (1.0, None, None)


def test_mean_suggestion_length_is_per_suggestion_not_per_task():
    summary = summarize_episodes(_episodes([dict(shown=1, lengths=[10]), dict(shown=3, lengths=[2, 2, 2])]))
    assert summary.mean_suggestion_tokens == pytest.approx(4.0)
    assert summary.mean_suggestion_chars == pytest.approx(16.0)


def test_a_task_scored_twice_is_an_error():
    episodes = _episodes([dict()]) * 2
    with pytest.raises(ValueError, match="t0"):
        summarize_episodes(episodes)


def test_trace_missing_a_field_is_named():
    trace = _trace()
    del trace["tokens_read"]
    with pytest.raises(ValueError, match="tokens_read"):
        episode_metrics(trace)


def test_mcnemar_without_discordant_pairs_is_one():
    assert mcnemar_exact(0, 0) == 1.0


def test_mcnemar_exact_matches_the_binomial_tail():
    # 8 tasks only A solved, 1 only B solved: two-sided exact p = 2 * P(X <= 1), X ~ Bin(9, 1/2).
    assert mcnemar_exact(8, 1) == pytest.approx(2 * (1 + 9) / 2**9)


def test_paired_comparison_uses_only_common_tasks():
    a = _episodes([dict(passed=True), dict(passed=True), dict(passed=False)])
    b = _episodes([dict(passed=False), dict(passed=True)])
    comparison = compare_episodes(a, b)
    assert (comparison.tasks, comparison.only_a_passed, comparison.only_b_passed) == (2, 1, 0)


def test_paired_comparison_detects_a_consistent_dpr_gain():
    a = _episodes([dict(passed=True, written=i) for i in range(25)])
    b = _episodes([dict(passed=True, written=i + 40) for i in range(25)])
    comparison = compare_episodes(a, b)
    assert comparison.dpr_difference.low > 0
    assert comparison.wilcoxon_p < 0.01


def test_identical_runs_are_not_different():
    a = _episodes([dict(passed=i % 2 == 0, written=i) for i in range(10)])
    comparison = compare_episodes(a, a)
    assert comparison.mcnemar_p == 1.0 and comparison.wilcoxon_p == 1.0


def test_runs_without_common_tasks_cannot_be_paired():
    with pytest.raises(ValueError, match="share no task"):
        compare_episodes(_episodes([dict()]), [episode_metrics(_trace("other"))])


def _run_folder(path, traces, **config):
    path.mkdir()
    (path / "config.json").write_text(
        json.dumps(
            {"assistant": "a", "human": "reference", "tasks": "toy", "count_tokenizer": "tok", **config}
        )
    )
    (path / "traces.jsonl").write_text("".join(json.dumps(t) + "\n" for t in traces))
    return path


def test_summary_is_rebuilt_from_the_run_folder(tmp_path):
    run = _run_folder(tmp_path / "run", [_trace("a", passed=True), _trace("b", passed=False)], n_tasks=2)
    summary = summarize_run(run)
    assert (summary.episodes, summary.pass_at_1.value, summary.complete) == (2, 0.5, True)


def test_summary_uses_the_dpr_weights_saved_with_the_run(tmp_path):
    run = _run_folder(tmp_path / "run", [_trace("a", written=2)], dpr_gamma=0.5, dpr_beta=1.0)
    assert summarize_run(run).dpr.value == pytest.approx(0.25)


def test_interrupted_run_is_summarized_as_incomplete(tmp_path):
    run = _run_folder(tmp_path / "run", [_trace("a")], n_tasks=5)
    assert summarize_run(run).complete is False


def test_torn_last_trace_line_is_skipped(tmp_path):
    run = _run_folder(tmp_path / "run", [_trace("a")])
    with open(run / "traces.jsonl", "a") as f:
        f.write('{"task_id": "b", "pas')
    assert [t["task_id"] for t in read_traces(run / "traces.jsonl")] == ["a"]


def test_broken_trace_line_in_the_middle_is_named(tmp_path):
    run = _run_folder(tmp_path / "run", [_trace("a")])
    (run / "traces.jsonl").write_text("not json\n" + json.dumps(_trace("b")) + "\n")
    with pytest.raises(ValueError, match=r"traces.jsonl:1"):
        read_traces(run / "traces.jsonl")


def test_folder_without_config_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        summarize_run(tmp_path)


def test_write_summary_produces_json_with_intervals(tmp_path):
    run = _run_folder(tmp_path / "run", [_trace(f"t{i}", passed=i % 2 == 0) for i in range(6)])
    saved = json.loads(write_summary(run).read_text())
    assert saved["pass_at_1"]["value"] == 0.5 and saved["pass_at_1"]["low"] is not None
    assert math.isclose(saved["dpr_gamma"], 0.999)


def test_compare_runs_pairs_folders_by_task(tmp_path):
    a = _run_folder(tmp_path / "a", [_trace("x", passed=True), _trace("y", passed=True)])
    b = _run_folder(tmp_path / "b", [_trace("y", passed=False), _trace("x", passed=True)])
    comparison = compare_runs(a, b)
    assert (comparison.only_a_passed, comparison.only_b_passed) == (1, 0)


def test_table_lists_every_run(tmp_path):
    from rich.console import Console

    runs = [_run_folder(tmp_path / name, [_trace("x")]) for name in ("first-run", "second-run")]
    console = Console(record=True, width=250)
    console.print(summary_table([summarize_run(r) for r in runs]))
    text = console.export_text()
    assert "first-run" in text and "second-run" in text


# ---------------------------------------------------------------- intervals, worked out by hand
# Wilson's 95% interval: (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), z = 1.959964 (z² = 3.841459).
# At n/n it is [n / (n + z²), 1]; at 0/n, [0, z² / (n + z²)].


def test_pass_at_1_interval_is_wilsons_and_does_not_collapse_at_the_extremes():
    all_pass = summarize_episodes(_episodes([dict(passed=True)] * 12)).pass_at_1
    assert (all_pass.value, all_pass.low, all_pass.high) == pytest.approx(
        (1.0, 12 / 15.841459, 1.0), abs=1e-6
    )
    none_pass = summarize_episodes(_episodes([dict(passed=False)] * 12)).pass_at_1
    assert (none_pass.low, none_pass.high) == pytest.approx((0.0, 3.841459 / 15.841459), abs=1e-6)
    # 7/12: p = 0.5833333; centre (0.5833333 + 0.1600608) / 1.3201216 = 0.563125; half-width
    # 1.959964 * sqrt(0.0202546 + 0.0066692) / 1.3201216 = 0.243614.
    seven = summarize_episodes(_episodes([dict(passed=i < 7) for i in range(12)])).pass_at_1
    assert (seven.low, seven.high) == pytest.approx((0.319511, 0.806739), abs=1e-5)


def test_acceptance_interval_is_wilsons_over_the_suggestions_shown():
    # 4 of 4 suggestions accepted, over two tasks: [4 / 7.841459, 1] = [0.510110, 1].
    summary = summarize_episodes(
        _episodes([dict(shown=3, accepted=3, lengths=(1, 1, 1)), dict(shown=1, accepted=1, lengths=(2,))])
    )
    assert (summary.acceptance.low, summary.acceptance.high) == pytest.approx((0.510110, 1.0), abs=1e-6)


def test_paired_pass_difference_of_identical_all_passing_runs_is_not_a_point():
    # Newcombe's method 10 with no discordant pairs and a zero margin (phi = 0): the half-widths are the
    # Wilson distances 1 - 10 / 13.841459 = 0.277533 on both sides of 0.
    a = _episodes([dict(passed=True)] * 10)
    difference = compare_episodes(a, a).pass_difference
    assert (difference.value, difference.low, difference.high) == pytest.approx(
        (0.0, -0.277533, 0.277533), abs=1e-6
    )


def test_paired_pass_difference_covers_a_real_gain():
    a = _episodes([dict(passed=True)] * 18 + [dict(passed=False)] * 2)
    b = _episodes([dict(passed=i < 8) for i in range(20)])  # b passes 8, all of them passed by a too
    difference = compare_episodes(a, b).pass_difference
    assert difference.value == pytest.approx(0.5) and 0 < difference.low < 0.5 < difference.high < 1


def test_dpr_interval_is_bca_and_a_constant_dpr_has_its_value_as_interval():
    varied = summarize_episodes(_episodes([dict(passed=True, written=i) for i in range(20)])).dpr
    assert varied.low < varied.value < varied.high
    constant = summarize_episodes(_episodes([dict(passed=False)] * 5)).dpr
    assert (constant.value, constant.low, constant.high) == (0.0, 0.0, 0.0)
