"""The study report: per-assistant metrics of the human study and the paper's significance tests.

Per assistant: acceptance rate (accepted / shown), suggestions shown per participant, mean
suggestion length in characters, characters deleted from accepted suggestions, and task success
(hidden tests on submitted code). Between assistants: the preference share of each survey
question with a binomial test, a two-proportion z-test on acceptance, and Welch's t-test plus
Mann-Whitney U on the other metrics (scipy), as in Ellis et al. (2025), human study.

Which characters came from a suggestion is reconstructed by replaying each session's edit
events (insert, delete, accepted suggestion) over the starter code, so the figure does not rest
on the browser's own count; the browser's count is stored too and the report flags disagreement.

Run: ``empower study report --db study.sqlite [--out DIR]`` (prints Markdown; DIR gets
``study_report.md`` and ``study_report.json``).
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from scipy import stats
from sqlalchemy import select

from empower.configs import option
from empower.serve.study.store import (
    SURVEY_QUESTIONS,
    Event,
    EventKind,
    Participant,
    StudySession,
    Suggestion,
    SurveyAnswer,
    latest_study,
    open_store,
)


@dataclass
class StudyReportConfig:
    db: str = option("study.sqlite", "SQLite file or SQLAlchemy URL of the study store")
    out: Path | None = option(None, "folder for study_report.md and study_report.json (default: print only)")


@dataclass
class Replay:
    """A session's buffer rebuilt from its events, and who wrote each character."""

    text: str
    deleted_from: dict[int, int]  # suggestion id -> characters of it deleted later
    accepted_chars: dict[int, int]  # suggestion id -> characters inserted on accept
    client_deleted: int  # the browser's own count, summed over delete events


def replay(initial: str, events: list) -> Replay:
    """Apply insert/delete/accepted events (in ``seq`` order) to ``initial``.

    Args:
        initial: the starter code the editor opened with.
        events: rows or objects with ``kind``, ``position``, ``text``, ``deleted_text``,
            ``suggestion_id``, ``deleted_from_suggestion``; sorted by ``seq``.

    Returns:
        the final text, and per accepted suggestion how many of its characters were deleted.

    >>> r = replay("ab", [_E("suggestion_accepted", 2, "cde", sid=7), _E("delete", 3, deleted="d")])
    >>> r.text, r.deleted_from
    ('abce', {7: 1})
    """
    chars = list(initial)
    origin: list[int | None] = [None] * len(chars)
    deleted_from: dict[int, int] = defaultdict(int)
    accepted_chars: dict[int, int] = {}
    client_deleted = 0
    for e in events:
        kind = EventKind(e.kind)
        if kind in (EventKind.INSERT, EventKind.ACCEPTED):
            pos, text = _checked_position(e, len(chars)), e.text or ""
            source = e.suggestion_id if kind is EventKind.ACCEPTED else None
            chars[pos:pos] = list(text)
            origin[pos:pos] = [source] * len(text)
            if kind is EventKind.ACCEPTED:
                accepted_chars[e.suggestion_id] = len(text)
        elif kind is EventKind.DELETE:
            pos, gone = _checked_position(e, len(chars)), e.deleted_text or ""
            if "".join(chars[pos : pos + len(gone)]) != gone:
                raise ValueError(
                    f"event seq {getattr(e, 'seq', '?')}: deleting {gone!r} at {pos} but the buffer holds "
                    f"{''.join(chars[pos : pos + len(gone)])!r}; events are missing or out of order"
                )
            for source in origin[pos : pos + len(gone)]:
                if source is not None:
                    deleted_from[source] += 1
            del chars[pos : pos + len(gone)]
            del origin[pos : pos + len(gone)]
            client_deleted += e.deleted_from_suggestion or 0
    return Replay("".join(chars), dict(deleted_from), accepted_chars, client_deleted)


def _checked_position(e, length: int) -> int:
    if e.position is None or not 0 <= e.position <= length:
        raise ValueError(
            f"event seq {getattr(e, 'seq', '?')}: position {e.position} outside buffer of {length}"
        )
    return e.position


@dataclass
class _E:
    """A bare edit event (doctests and callers without database rows)."""

    kind: str
    position: int
    text: str = ""
    deleted: str = ""
    sid: int | None = None

    @property
    def deleted_text(self):
        return self.deleted

    @property
    def suggestion_id(self):
        return self.sid

    deleted_from_suggestion = None


@dataclass
class ArmMetrics:
    label: str
    spec: str
    participants: int
    sessions: int
    shown: int
    accepted: int
    acceptance_rate: float | None
    shown_per_participant: float | None
    mean_suggestion_chars: float | None
    chars_deleted_from_accepted: int
    chars_deleted_per_accepted: float | None
    passed: int
    task_success: float | None
    latency_ms_median: float | None  # server time to produce a suggestion (all produced, shown or not)
    # per-unit samples for the tests (kept in the JSON so anyone can re-test)
    samples: dict[str, list[float]] = field(default_factory=dict, repr=False)


@dataclass
class TestResult:
    metric: str
    test: str
    arms: list[str]
    statistic: float | None
    p_value: float | None
    n: list[int]


@dataclass
class Preference:
    question: str
    text: str
    answers: int
    counts: dict[str, int]
    share: dict[str, float | None]
    p_value: dict[str, float | None]  # binomial test of each arm's share against 1 / arms


@dataclass
class StudyReport:
    study: str
    participants: int
    finished_participants: int
    arms: list[ArmMetrics]
    preferences: list[Preference]
    tests: list[TestResult]
    replay_mismatches: list[int]  # sessions whose replayed text or deletion count disagrees with the browser

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str) + "\n"

    def to_markdown(self) -> str:
        return _markdown(self)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def build_study_report(db: str) -> StudyReport:
    """Read the store and compute every metric and test of the most recent study in it."""
    if "://" not in db and not Path(db).is_file():
        raise FileNotFoundError(f"study database {db} does not exist; create it with `empower study create`")
    store = open_store(db)
    with store() as s:
        study = latest_study(s)
        arms = {a.id: a for a in study.assistants}
        participants = s.scalars(select(Participant).where(Participant.study_id == study.id)).all()
        samples = {a: defaultdict(list) for a in arms}
        totals = {a: defaultdict(int) for a in arms}
        seen_participants = {a: set() for a in arms}
        mismatches = []
        for p in participants:
            for session in p.sessions:
                events = s.scalars(
                    select(Event).where(Event.session_id == session.id).order_by(Event.seq)
                ).all()
                if not events and session.finished_at is None:
                    continue
                seen_participants[session.assistant_id].add(p.id)
                _session_metrics(s, session, study.tasks, events, samples, totals, mismatches)
        for a in arms:
            samples[a]["shown_per_participant"] = [
                float(totals[a][f"shown:{pid}"]) for pid in sorted(seen_participants[a])
            ]
        answers = s.scalars(
            select(SurveyAnswer).join(Participant).where(Participant.study_id == study.id)
        ).all()
        arm_metrics = [_arm(arms[a], samples[a], totals[a], len(seen_participants[a])) for a in arms]
        preferences = _preferences(answers, arms)
        return StudyReport(
            study=study.name,
            participants=len(participants),
            finished_participants=sum(p.finished_at is not None for p in participants),
            arms=arm_metrics,
            preferences=preferences,
            tests=_tests(arm_metrics),
            replay_mismatches=mismatches,
        )


def _session_metrics(s, session: StudySession, tasks, events, samples, totals, mismatches) -> None:
    a, pid = session.assistant_id, session.participant_id
    shown_ids = {e.suggestion_id for e in events if e.kind == EventKind.SHOWN.value and e.suggestion_id}
    accepted_ids = {e.suggestion_id for e in events if e.kind == EventKind.ACCEPTED.value and e.suggestion_id}
    result = replay(tasks[session.task_index]["prompt"], events)
    if sum(result.deleted_from.values()) != result.client_deleted or (
        session.final_code is not None and session.final_code != result.text
    ):
        mismatches.append(session.id)
    latencies = s.scalars(select(Suggestion.latency_ms).where(Suggestion.session_id == session.id)).all()
    samples[a]["latency_ms"].extend(latencies)
    if shown_ids:
        lengths = s.scalars(select(Suggestion.text).where(Suggestion.id.in_(shown_ids))).all()
        samples[a]["suggestion_chars"].extend(float(len(t)) for t in lengths)
    samples[a]["chars_deleted_per_accepted"].extend(
        float(result.deleted_from.get(sid, 0)) for sid in sorted(accepted_ids)
    )
    totals[a]["shown"] += len(shown_ids)
    totals[a]["accepted"] += len(accepted_ids & shown_ids)
    totals[a][f"shown:{pid}"] += len(shown_ids)
    totals[a]["deleted"] += sum(result.deleted_from.get(sid, 0) for sid in accepted_ids)
    totals[a]["sessions"] += 1
    if session.passed is not None:
        samples[a]["task_success"].append(float(session.passed))
        totals[a]["passed"] += int(session.passed)


def _arm(assistant, samples, totals, n_participants: int) -> ArmMetrics:
    shown, accepted = totals["shown"], totals["accepted"]
    return ArmMetrics(
        label=assistant.label,
        spec=assistant.spec,
        participants=n_participants,
        sessions=totals["sessions"],
        shown=shown,
        accepted=accepted,
        acceptance_rate=accepted / shown if shown else None,
        shown_per_participant=_mean(samples["shown_per_participant"]),
        mean_suggestion_chars=_mean(samples["suggestion_chars"]),
        chars_deleted_from_accepted=totals["deleted"],
        chars_deleted_per_accepted=_mean(samples["chars_deleted_per_accepted"]),
        passed=totals["passed"],
        task_success=_mean(samples["task_success"]),
        latency_ms_median=float(statistics.median(samples["latency_ms"])) if samples["latency_ms"] else None,
        samples={k: list(v) for k, v in samples.items()},
    )


def two_proportion_z(successes: list[int], trials: list[int]) -> tuple[float | None, float | None]:
    """Pooled two-sided z-test of equal proportions (the paper's test on acceptance)."""
    (x1, x2), (n1, n2) = successes, trials
    if n1 == 0 or n2 == 0:
        return None, None
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return None, None
    z = (x1 / n1 - x2 / n2) / se
    return z, float(2 * stats.norm.sf(abs(z)))


def _two_sample(metric: str, a: ArmMetrics, b: ArmMetrics) -> list[TestResult]:
    x, y = a.samples.get(metric, []), b.samples.get(metric, [])
    arms, n = [a.label, b.label], [len(x), len(y)]
    if len(x) < 2 or len(y) < 2:
        return [
            TestResult(metric, "welch_t", arms, None, None, n),
            TestResult(metric, "mann_whitney_u", arms, None, None, n),
        ]
    with warnings.catch_warnings():  # identical samples: scipy warns and returns nan, reported as n/a
        warnings.simplefilter("ignore", RuntimeWarning)
        t = stats.ttest_ind(x, y, equal_var=False)
        u = stats.mannwhitneyu(x, y, alternative="two-sided")
    return [
        TestResult(metric, "welch_t", arms, _finite(t.statistic), _finite(t.pvalue), n),
        TestResult(metric, "mann_whitney_u", arms, _finite(u.statistic), _finite(u.pvalue), n),
    ]


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _tests(arms: list[ArmMetrics]) -> list[TestResult]:
    results = []
    for a, b in itertools.combinations(arms, 2):
        z, p = two_proportion_z([a.accepted, b.accepted], [a.shown, b.shown])
        results.append(
            TestResult("acceptance_rate", "two_proportion_z", [a.label, b.label], z, p, [a.shown, b.shown])
        )
        for metric in (
            "shown_per_participant",
            "suggestion_chars",
            "chars_deleted_per_accepted",
            "task_success",
        ):
            results.extend(_two_sample(metric, a, b))
    return results


def _preferences(answers, arms) -> list[Preference]:
    labels = {a_id: a.label for a_id, a in arms.items()}
    out = []
    for question, text in SURVEY_QUESTIONS.items():
        chosen = [
            labels[a.assistant_id] for a in answers if a.question == question and a.assistant_id in labels
        ]
        n = len(chosen)
        counts = {label: chosen.count(label) for label in labels.values()}
        share = {label: (c / n if n else None) for label, c in counts.items()}
        p_value = {
            label: (float(stats.binomtest(c, n, 1 / len(labels)).pvalue) if n else None)
            for label, c in counts.items()
        }
        out.append(Preference(question, text, n, counts, share, p_value))
    return out


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def _markdown(r: StudyReport) -> str:
    lines = [
        f"# Study report: {r.study}",
        "",
        f"{r.participants} participants enrolled, {r.finished_participants} finished (survey answered).",
        "",
        "| assistant | spec | participants | shown | accepted | acceptance | shown / participant "
        "| mean suggestion chars | chars deleted from accepted (total, per accepted) | task success "
        "| median latency (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in r.arms:
        lines.append(
            f"| {a.label} | `{a.spec}` | {a.participants} | {a.shown} | {a.accepted} | {_fmt(a.acceptance_rate)} "
            f"| {_fmt(a.shown_per_participant, 1)} | {_fmt(a.mean_suggestion_chars, 1)} "
            f"| {a.chars_deleted_from_accepted}, {_fmt(a.chars_deleted_per_accepted, 2)} "
            f"| {a.passed}/{len(a.samples.get('task_success', []))} ({_fmt(a.task_success)}) "
            f"| {_fmt(a.latency_ms_median, 0)} |"
        )
    lines += ["", "## Preferences (binomial test against an even split)", ""]
    lines += ["| question | answers | " + " | ".join(f"{a.label} share (p)" for a in r.arms) + " |"]
    lines += ["|---|---|" + "---|" * len(r.arms)]
    for p in r.preferences:
        cells = " | ".join(f"{_fmt(p.share[a.label])} ({_fmt(p.p_value[a.label])})" for a in r.arms)
        lines.append(f"| {p.text} | {p.answers} | {cells} |")
    lines += [
        "",
        "## Tests between assistants",
        "",
        "| metric | test | arms | n | statistic | p |",
        "|---|---|---|---|---|---|",
    ]
    for t in r.tests:
        lines.append(
            f"| {t.metric} | {t.test} | {' vs '.join(t.arms)} | {'/'.join(map(str, t.n))} "
            f"| {_fmt(t.statistic)} | {_fmt(t.p_value, 4)} |"
        )
    if r.replay_mismatches:
        lines += [
            "",
            f"**Warning**: sessions {r.replay_mismatches} replay differently from what the browser saw.",
        ]
    return "\n".join(lines) + "\n"


def write_study_report(config: StudyReportConfig) -> StudyReport:
    """Build the report and, with ``config.out``, save it as Markdown and JSON."""
    report = build_study_report(config.db)
    if config.out is not None:
        config.out.mkdir(parents=True, exist_ok=True)
        (config.out / "study_report.md").write_text(report.to_markdown())
        (config.out / "study_report.json").write_text(report.to_json())
    return report
