"""Metrics of simulated code assistance: Pass@1, acceptance, Discounted Pass Rate, CIs, paired tests.

Everything here is a pure function of the trace lines an evaluation run writes (``traces.jsonl``,
one episode a line; see docs/design.md), so a summary is always rebuilt from disk, never kept in
memory by the run::

    summary = summarize_run("runs/eval/empower-ref")      # -> Summary (also: empower eval summary DIR...)
    comparison = compare_runs("runs/eval/empower-ref", "runs/eval/base-ref")

Definitions (docs/evaluation.md):
- Pass@1: share of tasks whose final program passes all tests (one episode per task).
- Acceptance rate: accepted / shown, pooled over a run, counting only *non-empty* suggestions (an
  empty suggestion is never shown, so neither accepting nor rejecting it means anything). Undefined
  (None) for a run that showed no suggestion.
- DPR (Discounted Pass Rate) per episode: ``1[passed] * gamma ** (alpha * tokens_read + beta *
  tokens_written)``, averaged over tasks.
- 95% confidence intervals. Proportions (Pass@1 over tasks, acceptance over the suggestions shown):
  Wilson score intervals, which stay honest at 0/n and n/n where a percentile bootstrap collapses to
  [0, 0] or [1, 1]. Acceptance treats each suggestion as independent; suggestions of one task are
  not, so its interval is optimistic when acceptance varies a lot between tasks. Means (DPR, tokens
  read and written): BCa bootstrap over tasks (``scipy.stats.bootstrap``, seeded), the percentile
  bootstrap where BCa is undefined (all values equal).
- Paired tests of two runs on the same tasks: for pass/fail, McNemar's exact test with Newcombe's
  (1998, method 10) interval for the difference of the paired proportions; for DPR, the Wilcoxon
  signed-rank test with a paired BCa bootstrap interval of the mean difference.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from empower.configs import option
from empower.jsonl import iter_jsonl

log = logging.getLogger(__name__)

TRACE_FIELDS = (
    "task_id",
    "passed",
    "tokens_read",
    "tokens_written",
    "suggestions",
    "accepted",
    "suggestion_tokens",
    "suggestion_chars",
    "chars_deleted_from_accepted",
    "turns",
    "end_reason",
    "status",
)


@dataclass
class MetricsConfig:
    """How episodes are scored and how uncertain the scores are (saved with every run)."""

    dpr_gamma: float = option(0.999, "DPR discount per unit of human effort (0 < gamma <= 1)")
    dpr_alpha: float = option(0.1, "DPR effort of reading one suggested token")
    dpr_beta: float = option(0.5, "DPR effort of writing one token oneself")
    metrics_resamples: int = option(
        10_000, "bootstrap resamples for the 95% intervals of means (DPR, tokens)", resumable=True
    )
    metrics_seed: int = option(0, "seed of the bootstrap (same seed, same intervals)", resumable=True)

    def __post_init__(self):
        if not 0 < self.dpr_gamma <= 1:
            raise ValueError(f"dpr_gamma must be in (0, 1], got {self.dpr_gamma}")
        for name in ("dpr_alpha", "dpr_beta"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.metrics_resamples < 100:
            raise ValueError(f"metrics_resamples must be >= 100, got {self.metrics_resamples}")


def discounted_pass(
    passed: bool, tokens_read: int, tokens_written: int, config: MetricsConfig | None = None
) -> float:
    """DPR of one episode: success discounted by the human's reading and writing effort.

    Example: ``discounted_pass(True, 100, 20)`` = 0.999 ** (0.1 * 100 + 0.5 * 20) ~ 0.980.
    """
    config = config or MetricsConfig()
    if tokens_read < 0 or tokens_written < 0:
        raise ValueError(f"token counts must be >= 0, got read={tokens_read} written={tokens_written}")
    if not passed:
        return 0.0
    return float(config.dpr_gamma ** (config.dpr_alpha * tokens_read + config.dpr_beta * tokens_written))


def acceptance_rate(accepted: int, shown: int) -> float | None:
    """Accepted / shown non-empty suggestions; None when nothing was shown (undefined, not 0)."""
    if accepted < 0 or accepted > shown:
        raise ValueError(f"accepted must be in [0, shown={shown}], got {accepted}")
    return accepted / shown if shown else None


@dataclass(frozen=True)
class Estimate:
    """A statistic with its 95% interval (Wilson, Newcombe or bootstrap; None with fewer than 2 samples)."""

    value: float
    low: float | None = None
    high: float | None = None

    def format(self, digits: int = 3) -> str:
        if self.low is None or self.high is None:
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def bootstrap(
    samples: tuple[np.ndarray, ...], statistic, config: MetricsConfig, method: str = "BCa"
) -> Estimate:
    """BCa bootstrap over tasks; ``samples`` are per-task arrays resampled together (paired). Where
    BCa is undefined (every value the same), the percentile interval, which is then that value.
    ``method="percentile"`` for statistics of pooled counts, whose jackknife BCa needs may degenerate."""
    value = float(statistic(*samples, axis=-1))
    if len(samples[0]) < 2:
        return Estimate(value)
    degenerate = all(np.all(s == s[0]) for s in samples)
    result = stats.bootstrap(
        samples,
        statistic,
        n_resamples=config.metrics_resamples,
        paired=True,
        vectorized=True,
        method="percentile" if degenerate else method,
        rng=np.random.default_rng(config.metrics_seed),
    )
    low, high = result.confidence_interval
    return Estimate(value, float(low), float(high))


def wilson(successes: int, trials: int) -> Estimate:
    """A proportion with its 95% Wilson score interval (no interval for fewer than 2 trials)."""
    value = successes / trials
    if trials < 2:
        return Estimate(value)
    interval = stats.binomtest(int(successes), int(trials)).proportion_ci(0.95, method="wilson")
    return Estimate(value, float(interval.low), float(interval.high))


def paired_difference(both: int, only_a: int, only_b: int, neither: int) -> Estimate:
    """Difference of two paired proportions, p_a - p_b, with Newcombe's (1998) method-10 95% interval.

    It combines the two Wilson intervals with the correlation of the pairs, so unlike a bootstrap it
    does not collapse to [0, 0] when the runs agree on every task.
    """
    n = both + only_a + only_b + neither
    p_a, p_b = (both + only_a) / n, (both + only_b) / n
    a, b = wilson(both + only_a, n), wilson(both + only_b, n)
    if a.low is None:
        return Estimate(p_a - p_b)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / np.sqrt(margins) if margins else 0.0
    down = np.sqrt((p_a - a.low) ** 2 - 2 * phi * (p_a - a.low) * (b.high - p_b) + (b.high - p_b) ** 2)
    up = np.sqrt((a.high - p_a) ** 2 - 2 * phi * (a.high - p_a) * (p_b - b.low) + (p_b - b.low) ** 2)
    return Estimate(p_a - p_b, float(p_a - p_b - down), float(p_a - p_b + up))


def _mean(values, axis=-1):
    return np.mean(values, axis=axis)


@dataclass(frozen=True)
class EpisodeMetrics:
    """The numbers of one episode, read from its trace line."""

    task_id: str
    passed: bool
    dpr: float
    shown: int
    accepted: int
    tokens_read: int
    tokens_written: int
    suggestion_tokens: tuple[int, ...]
    suggestion_chars: tuple[int, ...]
    chars_deleted_from_accepted: int
    turns: int
    end_reason: str
    status: str

    @property
    def acceptance(self) -> float | None:
        return acceptance_rate(self.accepted, self.shown)


def episode_metrics(
    trace: dict, config: MetricsConfig | None = None, *, where: str = "trace"
) -> EpisodeMetrics:
    """Score one trace line (DPR recomputed with ``config``, so runs compare under one setting)."""
    missing = [name for name in TRACE_FIELDS if name not in trace]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    passed = bool(trace["passed"])
    return EpisodeMetrics(
        task_id=str(trace["task_id"]),
        passed=passed,
        dpr=discounted_pass(passed, int(trace["tokens_read"]), int(trace["tokens_written"]), config),
        shown=int(trace["suggestions"]),
        accepted=int(trace["accepted"]),
        tokens_read=int(trace["tokens_read"]),
        tokens_written=int(trace["tokens_written"]),
        suggestion_tokens=tuple(int(n) for n in trace["suggestion_tokens"]),
        suggestion_chars=tuple(int(n) for n in trace["suggestion_chars"]),
        chars_deleted_from_accepted=int(trace["chars_deleted_from_accepted"]),
        turns=int(trace["turns"]),
        end_reason=str(trace["end_reason"]),
        status=str(trace["status"]),
    )


def read_traces(path: str | Path) -> list[dict]:
    """The trace lines of ``traces.jsonl``. A torn last line (a run killed mid-write) is skipped with
    a warning, since the episode is simply not finished; a broken line elsewhere is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file {path} does not exist")
    return [record for _, record in iter_jsonl(path, cut_tail_ok=True)]


@dataclass
class Summary:
    """One run's metrics over its tasks (what ``summary.json`` holds)."""

    run: str
    assistant: str
    human: str
    tasks: str
    episodes: int
    expected: int | None
    complete: bool
    excluded: int
    pass_at_1: Estimate
    acceptance: Estimate | None
    dpr: Estimate
    suggestions: int
    accepted: int
    suggestions_per_episode: float
    mean_suggestion_tokens: float | None
    mean_suggestion_chars: float | None
    tokens_read: Estimate
    tokens_written: Estimate
    chars_deleted_from_accepted: int
    mean_turns: float
    end_reasons: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    count_tokenizer: str | None = None
    dpr_gamma: float = 0.999
    dpr_alpha: float = 0.1
    dpr_beta: float = 0.5

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def summarize_episodes(
    episodes: list[EpisodeMetrics],
    config: MetricsConfig | None = None,
    *,
    run: str = "run",
    assistant: str = "?",
    human: str = "?",
    tasks: str = "?",
    expected: int | None = None,
    excluded: int = 0,
    count_tokenizer: str | None = None,
) -> Summary:
    """Aggregate episodes (one per task) into a :class:`Summary`; ``expected`` = tasks the run should have."""
    config = config or MetricsConfig()
    if not episodes:
        raise ValueError(f"no finished episodes to summarize in run {run}")
    ids = [e.task_id for e in episodes]
    repeated = sorted(task for task, n in Counter(ids).items() if n > 1)
    if repeated:
        raise ValueError(f"run {run}: task(s) scored twice: {', '.join(repeated[:5])}")
    passed = np.array([e.passed for e in episodes], dtype=float)
    dpr = np.array([e.dpr for e in episodes])
    shown = np.array([e.shown for e in episodes], dtype=float)
    accepted = np.array([e.accepted for e in episodes], dtype=float)
    with_suggestions = shown > 0
    lengths = [n for e in episodes for n in e.suggestion_tokens]
    chars = [n for e in episodes for n in e.suggestion_chars]
    return Summary(
        run=run,
        assistant=assistant,
        human=human,
        tasks=tasks,
        excluded=excluded,
        count_tokenizer=count_tokenizer,
        episodes=len(episodes),
        expected=expected,
        complete=expected is not None and len(episodes) == expected,
        pass_at_1=wilson(int(passed.sum()), len(passed)),
        acceptance=wilson(int(accepted.sum()), int(shown.sum())) if with_suggestions.any() else None,
        dpr=bootstrap((dpr,), _mean, config),
        suggestions=int(shown.sum()),
        accepted=int(accepted.sum()),
        suggestions_per_episode=float(shown.mean()),
        mean_suggestion_tokens=float(np.mean(lengths)) if lengths else None,
        mean_suggestion_chars=float(np.mean(chars)) if chars else None,
        tokens_read=bootstrap((np.array([e.tokens_read for e in episodes], dtype=float),), _mean, config),
        tokens_written=bootstrap(
            (np.array([e.tokens_written for e in episodes], dtype=float),), _mean, config
        ),
        chars_deleted_from_accepted=sum(e.chars_deleted_from_accepted for e in episodes),
        mean_turns=float(np.mean([e.turns for e in episodes])),
        end_reasons=dict(Counter(e.end_reason for e in episodes)),
        statuses=dict(Counter(e.status for e in episodes)),
        dpr_gamma=config.dpr_gamma,
        dpr_alpha=config.dpr_alpha,
        dpr_beta=config.dpr_beta,
    )


def _run_config(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err


def _metrics_config(saved: dict) -> MetricsConfig:
    names = {f.name for f in dataclasses.fields(MetricsConfig)}
    return MetricsConfig(**{k: v for k, v in saved.items() if k in names})


def run_episodes(run_dir: str | Path, config: MetricsConfig | None = None) -> list[EpisodeMetrics]:
    """The scored episodes of a run folder (DPR with the run's saved weights unless ``config`` given)."""
    run_dir = Path(run_dir)
    config = config or _metrics_config(_run_config(run_dir))
    path = run_dir / "traces.jsonl"
    return [episode_metrics(t, config, where=f"{path} ({t.get('task_id', '?')})") for t in read_traces(path)]


def summarize_run(run_dir: str | Path, config: MetricsConfig | None = None) -> Summary:
    """Rebuild a run's :class:`Summary` from ``config.json`` and ``traces.jsonl``.

    Args:
        run_dir: a run folder written by ``empower eval`` (``env.run_eval``).
        config: DPR weights and bootstrap settings; default: the ones saved with the run.

    Returns:
        the Summary; ``complete`` is False while episodes are missing (an interrupted run).
    """
    run_dir = Path(run_dir)
    saved = _run_config(run_dir)
    config = config or _metrics_config(saved)
    return summarize_episodes(
        run_episodes(run_dir, config),
        config,
        run=run_dir.name,
        assistant=str(saved.get("assistant", "?")),
        human=str(saved.get("human", "?")),
        tasks=str(saved.get("tasks", "?")),
        expected=saved.get("n_tasks"),
        excluded=len(saved.get("excluded_tasks", [])),
        count_tokenizer=saved.get("count_tokenizer"),
    )


def write_summary(run_dir: str | Path) -> Path:
    """Rebuild ``summary.json`` of a run folder from its traces; returns its path."""
    path = Path(run_dir) / "summary.json"
    path.write_text(json.dumps(summarize_run(run_dir).to_dict(), indent=2) + "\n")
    return path


@dataclass(frozen=True)
class Comparison:
    """Run A vs run B on the tasks both finished (paired by task_id)."""

    run_a: str
    run_b: str
    tasks: int
    pass_a: float
    pass_b: float
    only_a_passed: int
    only_b_passed: int
    mcnemar_p: float
    pass_difference: Estimate
    dpr_difference: Estimate
    wilcoxon_p: float


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs (1.0 when there are none)."""
    if only_a + only_b == 0:
        return 1.0
    return float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)


def compare_episodes(
    a: list[EpisodeMetrics],
    b: list[EpisodeMetrics],
    config: MetricsConfig | None = None,
    *,
    run_a: str = "A",
    run_b: str = "B",
) -> Comparison:
    """Paired tests of two runs; only tasks present in both count (an error if there are none)."""
    config = config or MetricsConfig()
    by_task_b = {e.task_id: e for e in b}
    pairs = [(e, by_task_b[e.task_id]) for e in a if e.task_id in by_task_b]
    if not pairs:
        raise ValueError(f"runs {run_a} and {run_b} share no task; a paired test needs the same tasks")
    passed_a = np.array([x.passed for x, _ in pairs])
    passed_b = np.array([y.passed for _, y in pairs])
    only_a, only_b = int((passed_a & ~passed_b).sum()), int((passed_b & ~passed_a).sum())
    differences = np.array([x.dpr - y.dpr for x, y in pairs])
    nonzero = differences[differences != 0]
    wilcoxon_p = float(stats.wilcoxon(nonzero).pvalue) if len(nonzero) else 1.0
    return Comparison(
        run_a=run_a,
        run_b=run_b,
        tasks=len(pairs),
        pass_a=float(passed_a.mean()),
        pass_b=float(passed_b.mean()),
        only_a_passed=only_a,
        only_b_passed=only_b,
        mcnemar_p=mcnemar_exact(only_a, only_b),
        pass_difference=paired_difference(
            int((passed_a & passed_b).sum()), only_a, only_b, int((~passed_a & ~passed_b).sum())
        ),
        dpr_difference=bootstrap((differences,), _mean, config),
        wilcoxon_p=wilcoxon_p,
    )


def compare_runs(run_a: str | Path, run_b: str | Path, config: MetricsConfig | None = None) -> Comparison:
    """Paired comparison of two run folders (DPR weights of run A unless ``config`` given)."""
    config = config or _metrics_config(_run_config(Path(run_a)))
    return compare_episodes(
        run_episodes(run_a, config),
        run_episodes(run_b, config),
        config,
        run_a=Path(run_a).name,
        run_b=Path(run_b).name,
    )


def summary_table(summaries: list[Summary]):
    """A rich Table of runs side by side (what ``empower eval summary`` prints)."""
    from rich.table import Table

    table = Table(title="Evaluation runs (95% intervals: Wilson for proportions, BCa bootstrap for means)")
    for column in (
        "run",
        "assistant",
        "human",
        "tasks",
        "Pass@1",
        "acceptance",
        "DPR",
        "read/ep",
        "written/ep",
        "sugg/ep",
        "len tok",
        "len chars",
    ):
        table.add_column(column, justify="left" if column in ("run", "assistant", "human") else "right")
    for s in summaries:
        done = f"{s.episodes}" + ("" if s.complete or s.expected is None else f"/{s.expected} (incomplete)")
        table.add_row(
            s.run,
            s.assistant,
            s.human,
            done + (f" -{s.excluded}" if s.excluded else ""),
            s.pass_at_1.format(),
            s.acceptance.format() if s.acceptance else "n/a",
            s.dpr.format(),
            f"{s.tokens_read.value:.1f}",
            f"{s.tokens_written.value:.1f}",
            f"{s.suggestions_per_episode:.1f}",
            _maybe(s.mean_suggestion_tokens),
            _maybe(s.mean_suggestion_chars),
        )
    return table


def comparison_table(comparisons: list[Comparison]):
    """A rich Table of paired tests against a baseline run."""
    from rich.table import Table

    table = Table(title="Paired tests (same tasks)")
    for column in (
        "run",
        "baseline",
        "tasks",
        "Pass@1",
        "baseline Pass@1",
        "only run / only base",
        "Pass@1 difference",
        "McNemar p",
        "DPR difference",
        "Wilcoxon p",
    ):
        table.add_column(column, justify="left" if column in ("run", "baseline") else "right")
    for c in comparisons:
        table.add_row(
            c.run_a,
            c.run_b,
            str(c.tasks),
            f"{c.pass_a:.3f}",
            f"{c.pass_b:.3f}",
            f"{c.only_a_passed} / {c.only_b_passed}",
            c.pass_difference.format(),
            f"{c.mcnemar_p:.3g}",
            c.dpr_difference.format(),
            f"{c.wilcoxon_p:.3g}",
        )
    return table


def _maybe(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"
