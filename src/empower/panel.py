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

import dataclasses
import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from empower import metrics, models
from empower.configs import config_from_dict, option, part_of, to_dict
from empower.env import EvalConfig
from empower.humans import Decision, Human, HumanConfig, HumanView, build_human
from empower.metrics import Estimate, MetricsConfig, Summary, bootstrap
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


# --------------------------------------------------------------------------------------------------
# The panel: one assistant before every human, in one table

# Every human of docs/assistants-and-humans.md at the settings documented there; ``llm`` is the
# yardstick whose recorded decisions the others are compared with.
DEFAULT_PANEL: tuple[dict, ...] = (
    {"label": "reference", "human": "reference"},
    {"label": "fallible", "human": "reference", "human_tolerance": 0.25},
    {"label": "repairing", "human": "reference", "human_tolerance": 0.25, "human_repair": 0.5},
    {"label": "plausible", "human": "plausible"},
    {"label": "llm", "human": "llm"},
)


@dataclass
class PanelConfig(EvalConfig):
    """One assistant (the assistant flags) before every human of a panel, on the same tasks with the
    same budget; each human's run goes to ``out/<label>``, and a rerun resumes them."""

    panel: Path | None = option(
        None,
        "YAML file with `humans:`, a list of {label, human_* settings} (default: the documented panel: "
        "reference, fallible, repairing, plausible, llm)",
    )
    yardstick: str = option(
        "llm",
        "label of the human whose recorded decisions the others' agreement is measured against ('' : none)",
    )

    def __post_init__(self):
        if self.out is None:
            self.out = Path("runs/panel") / Path(str(self.assistant)).name
        super().__post_init__()
        entries = panel_humans(self.panel)
        if self.yardstick and self.yardstick not in {e["label"] for e in entries}:
            raise ValueError(
                f"yardstick {self.yardstick!r} is not a human of the panel "
                f"({', '.join(e['label'] for e in entries)})"
            )


def panel_humans(path: Path | None) -> list[dict]:
    """The panel's humans: ``DEFAULT_PANEL``, or the ``humans:`` of a YAML file, each a label and human
    settings only (the assistant, tasks and budget are the panel's own, the same for every human).
    Errors name the file and the entry."""
    if path is None:
        return [dict(e) for e in DEFAULT_PANEL]
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"panel file {path} does not exist")
    entries = (yaml.safe_load(path.read_text()) or {}).get("humans")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected `humans:`, a non-empty list of human settings")
    allowed = {f.name for f in fields(HumanConfig)}
    labels = []
    for i, entry in enumerate(entries):
        where = f"{path}: humans[{i}]"
        if not isinstance(entry, dict) or not entry.get("label"):
            raise ValueError(f"{where}: each human needs a `label` and its settings")
        unknown = sorted(set(entry) - allowed - {"label"})
        if unknown:
            raise ValueError(
                f"{where}: {', '.join(unknown)} cannot differ between the panel's humans (only human "
                "settings may: every human meets the same assistant, tasks and budget)"
            )
        try:
            config_from_dict(HumanConfig, {k: v for k, v in entry.items() if k != "label"}, where=where)
        except ValueError as err:
            raise ValueError(str(err) if str(err).startswith(where) else f"{where}: {err}") from err
        labels.append(str(entry["label"]))
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise ValueError(f"{path}: labels must differ; repeated: {', '.join(repeated)}")
    return [dict(e, label=str(e["label"])) for e in entries]


@dataclass(frozen=True)
class PanelRow:
    """One human of the panel: its run's metrics on the panel's common tasks, and how it agrees with
    the yardstick's recorded decisions (None for the yardstick itself, or without one)."""

    label: str
    run: Path
    summary: Summary
    agreement: Agreement | None


def run_panel(config: PanelConfig, progress: bool = True) -> list[PanelRow]:
    """Evaluate the assistant with every human of the panel (resuming what is done), then measure each
    human's agreement with the yardstick on the suggestions the yardstick's run showed."""
    from empower.env import run_eval

    base, pool, runs = part_of(config, EvalConfig), models.ModelPool(), {}
    for entry in panel_humans(config.panel):
        settings = {k: v for k, v in entry.items() if k != "label"}
        human = config_from_dict(HumanConfig, {**to_dict(part_of(config, HumanConfig)), **settings})
        run_config = replace(base, **to_dict(human), out=config.out / entry["label"], resume=True)
        runs[entry["label"]] = (run_eval(run_config, progress=progress, pool=pool), human)
    played = {label: metrics.run_episodes(run, config) for label, (run, _) in runs.items()}
    common = set.intersection(*({e.task_id for e in episodes} for episodes in played.values()))
    if not common:
        raise ValueError(f"the panel's runs in {config.out} share no task: nothing to compare")
    yardstick = runs.get(config.yardstick)
    traces = tasks = None
    if yardstick:
        traces = [t for t in metrics.read_traces(yardstick[0] / "traces.jsonl") if t["task_id"] in common]
        tasks = run_tasks(yardstick[0])
    rows = []
    for label, (run, human) in runs.items():
        episodes = [e for e in played[label] if e.task_id in common]
        saved = json.loads((run / "config.json").read_text())
        summary = metrics.summarize_episodes(
            episodes, config, run=label, assistant=str(saved.get("assistant", "?")), human=label,
            tasks=str(saved.get("tasks", "?")), expected=len(common),
        )  # fmt: skip
        agrees_with = None
        if yardstick and label != config.yardstick and any(t["suggestions"] for t in traces):
            agrees_with = agreement(traces, tasks, build_human(human, pool=pool), config)
        rows.append(PanelRow(label, run, summary, agrees_with))
    return rows


def _columns(yardstick: str) -> list[str]:
    who = yardstick or "-"
    return ["human", "Pass@1 [95% CI]", "DPR [95% CI]", "acceptance [95% CI]", "chars/suggestion",
            "chars deleted/episode", f"kappa with {who} [95% CI]", f"acceptance on {who}'s suggestions"]  # fmt: skip


def _cells(r: PanelRow) -> list[str]:
    """One human's row of the panel table (the rich table and panel.md show the same cells)."""
    s = r.summary
    return [
        r.label, s.pass_at_1.format(), s.dpr.format(), s.acceptance.format() if s.acceptance else "-",
        f"{s.mean_suggestion_chars:.1f}" if s.mean_suggestion_chars is not None else "-",
        f"{s.chars_deleted_from_accepted / s.episodes:.2f}",
        r.agreement.kappa.format() if r.agreement else "-",
        f"{r.agreement.acceptance:.3f}" if r.agreement else "-",
    ]  # fmt: skip


def panel_table(rows: list[PanelRow], yardstick: str):
    """A rich table: per human, Pass@1, DPR, acceptance, characters deleted, agreement (kappa) with the
    yardstick on its suggestions (its acceptance there is in the agreement table)."""
    from rich.table import Table

    table = Table(title=f"The panel: one assistant, every human, the same {rows[0].summary.episodes} tasks")
    for column in _columns(yardstick)[:7]:
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(*_cells(r)[:7])
    return table


def write_panel(rows: list[PanelRow], out: Path, yardstick: str) -> Path:
    """``out/panel.json`` (every row's summary and agreement counts) and ``out/panel.md`` (the table)."""
    records = [
        {"label": r.label, "run": str(r.run), "summary": r.summary.to_dict(),
         "agreement": dataclasses.asdict(r.agreement) if r.agreement else None}
        for r in rows
    ]  # fmt: skip
    (out / "panel.json").write_text(json.dumps({"yardstick": yardstick, "humans": records}, indent=2) + "\n")
    columns = _columns(yardstick)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    (out / "panel.md").write_text("\n".join(lines) + "\n")
    return out / "panel.md"
