"""The panel of simulated humans: how one human decides on the suggestions another one was shown.

A human is judged by evidence, not by the ranking of methods it produces. The first evidence is
*agreement*: replay recorded runs (the LLM human's, say) and put each shown suggestion, in the
program it was shown in, before a candidate human; compare its accept/reject with the recorded one.
Cohen's kappa corrects the raw agreement for what two humans with those acceptance rates would agree
on by chance; its 95% interval (percentile bootstrap) resamples tasks, since the decisions of one
episode are not independent.

    empower eval agree runs/eval/smollm2-135m-base-n-llm-humaneval --human reference --human-tolerance 0.25
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from empower.humans import Decision, Human, HumanView
from empower.metrics import Estimate, MetricsConfig, bootstrap
from empower.tasks import Task, load_tasks


@dataclass(frozen=True)
class Shown:
    """One suggestion shown in a recorded episode, and what the recorded human did with it."""

    task_id: str
    state: str  # the program when the suggestion was shown
    suggestion: str
    accepted: bool


def shown_suggestions(trace: dict, prompt: str) -> list[Shown]:
    """Every suggestion a trace shows, in the program it was shown in: the events replayed from the
    task's prompt. Raises ValueError when the replay does not give the trace's saved program."""
    state, shown, events = prompt, [], trace["events"]
    for i, event in enumerate(events):
        if event["kind"] == "suggested":
            accepted = i + 1 < len(events) and events[i + 1]["kind"] == "accepted"
            shown.append(Shown(trace["task_id"], state, event["text"], accepted))
        elif event["kind"] in ("accepted", "wrote"):
            state += event["text"]
        elif event["kind"] == "deleted":
            state = state[: len(state) - len(event["text"])]
    if state != trace["program"]:
        raise ValueError(
            f"{trace['task_id']}: replaying the trace's events from the task's prompt does not give its "
            "saved program (a different task file?)"
        )
    return shown


def cohen_kappa(both, only_recorded, only_candidate, neither, axis=-1):
    """Cohen's kappa of two raters' accept decisions from their 2x2 counts (summed along ``axis``
    when given arrays, so that it is a vectorized bootstrap statistic). Where chance agreement is
    certain (both raters always decide the same way), kappa is 1 if they agree and 0 otherwise."""
    a, b, c, d = (
        np.sum(np.asarray(x, dtype=float), axis=axis) for x in (both, only_recorded, only_candidate, neither)
    )
    n = a + b + c + d
    observed = (a + d) / n
    p_recorded, p_candidate = (a + b) / n, (a + c) / n
    chance = p_recorded * p_candidate + (1 - p_recorded) * (1 - p_candidate)
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = np.where(chance < 1, (observed - chance) / (1 - chance), (observed == 1).astype(float))
    return kappa


# Suggestion lengths in characters, bins starting at: 1-10, 11-20, 21-40, 41-80, 81 and more. The
# paper's study saw mean lengths of 43.6 (Empower) and 82.2 (Base-20) characters, accepted 8.08% and
# 6.18% of the time by real programmers (Ellis et al. 2025, human study; ../shared/paper.md).
LENGTH_BINS = (1, 11, 21, 41, 81)


@dataclass(frozen=True)
class LengthBin:
    """Suggestions of one length range: how many were shown, and accepted by each human."""

    label: str
    shown: int
    accepted: int  # by the candidate human
    recorded: int  # by the recorded human


def by_length(lengths: list[int], candidate: list[bool], recorded: list[bool]) -> tuple[LengthBin, ...]:
    """Acceptance by suggestion length (:data:`LENGTH_BINS`) of both humans on the same suggestions."""
    bins = []
    for i, low in enumerate(LENGTH_BINS):
        high = LENGTH_BINS[i + 1] - 1 if i + 1 < len(LENGTH_BINS) else None
        inside = [j for j, n in enumerate(lengths) if n >= low and (high is None or n <= high)]
        label = f"{low}-{high}" if high else f"{low}+"
        bins.append(
            LengthBin(label, len(inside), sum(candidate[j] for j in inside), sum(recorded[j] for j in inside))
        )
    return tuple(bins)


@dataclass(frozen=True)
class Agreement:
    """How a candidate human's decisions agree with a recorded human's on the same suggestions."""

    human: str
    recorded: str
    tasks: int
    decisions: int
    both: int  # both accept
    only_recorded: int
    only_candidate: int
    neither: int
    kappa: Estimate
    by_length: tuple[LengthBin, ...] = ()

    @property
    def raw(self) -> float:
        return (self.both + self.neither) / self.decisions

    @property
    def acceptance(self) -> float:
        return (self.both + self.only_candidate) / self.decisions

    @property
    def recorded_acceptance(self) -> float:
        return (self.both + self.only_recorded) / self.decisions


def agreement(traces: list[dict], tasks: dict[str, Task], human: Human, config: MetricsConfig) -> Agreement:
    """Put every suggestion shown in ``traces`` before ``human``; count its decisions against the
    recorded ones, per task, and give Cohen's kappa with a 95% bootstrap interval over tasks."""
    missing = sorted({t["task_id"] for t in traces} - set(tasks))
    if missing:
        raise ValueError(f"the traces hold tasks the task set lacks: {', '.join(missing[:5])}")
    shown = [s for t in traces for s in shown_suggestions(t, tasks[t["task_id"]].prompt)]
    if not shown:
        raise ValueError("the traces show no suggestion: nothing to agree on")
    turns = human.respond([HumanView(tasks[s.task_id], s.state, s.suggestion) for s in shown])
    order = sorted({s.task_id for s in shown})
    row = {task_id: i for i, task_id in enumerate(order)}
    counts = np.zeros((4, len(order)), dtype=int)  # both, only recorded, only candidate, neither
    accepts = [turn.decision is Decision.ACCEPT for turn in turns]
    for s, candidate in zip(shown, accepts, strict=True):
        cell = 0 if s.accepted and candidate else 1 if s.accepted else 2 if candidate else 3
        counts[cell, row[s.task_id]] += 1
    kappa = bootstrap(tuple(counts), cohen_kappa, config, method="percentile")
    both, only_recorded, only_candidate, neither = (int(c) for c in counts.sum(axis=1))
    return Agreement(
        human.name, traces[0].get("human", "recorded"), len(order), len(shown),
        both, only_recorded, only_candidate, neither, kappa,
        by_length([len(s.suggestion) for s in shown], accepts, [s.accepted for s in shown]),
    )  # fmt: skip


def run_tasks(run_dir: str | Path) -> dict[str, Task]:
    """The tasks of a run folder, loaded as its ``config.json`` says, by task id."""
    saved = json.loads((Path(run_dir) / "config.json").read_text())
    return {t.task_id: t for t in load_tasks(saved["tasks"], saved.get("tasks_path"))}


def agreement_table(rows: list[Agreement]):
    """A rich table: decisions, raw agreement, kappa with its interval, both humans' acceptance."""
    from rich.table import Table

    table = Table(title="Agreement with the recorded human's decisions (same suggestions, same programs)")
    for column in ("human", "recorded human", "tasks", "decisions", "agreement", "kappa [95% CI]",
                   "acceptance", "recorded acceptance"):  # fmt: skip
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(
            r.human, r.recorded, str(r.tasks), str(r.decisions), f"{r.raw:.3f}", r.kappa.format(),
            f"{r.acceptance:.3f}", f"{r.recorded_acceptance:.3f}",
        )  # fmt: skip
    return table


def length_table(rows: list[Agreement]):
    """A rich table: per length bin, each human's acceptance on the same suggestions."""
    from rich.table import Table

    table = Table(title="Acceptance by suggestion length (characters), same suggestions")
    table.add_column("human", overflow="fold")
    for b in rows[0].by_length if rows else ():
        table.add_column(b.label)
    for r in rows:
        for who, taken in ((r.human, "accepted"), (r.recorded + " (recorded)", "recorded")):
            table.add_row(who, *(_rate(getattr(b, taken), b.shown) for b in r.by_length))
    return table


def _rate(accepted: int, shown: int) -> str:
    return f"{accepted / shown:.2f} ({accepted}/{shown})" if shown else "-"
