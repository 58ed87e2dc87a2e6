"""The simulated multi-turn code-assistance environment: batched episodes, traces, run folders, resume.

An episode starts from a task's starter code (the *state*). Each turn the assistant suggests text to
append; the simulated human sees it and decides (ACCEPT appends it, then the human's own text; REJECT
appends only the human's text; FINISH ends the episode after the human's text). Episodes end on
FINISH, after ``sim_max_rounds`` turns, or when the program reaches ``sim_max_tokens``; the final
program then runs in the sandbox against all tests.

Model calls dominate the cost and batched generation is several times faster per token than batch 1,
so up to ``sim_batch_size`` episodes are stepped together: each step sends every live episode's
request to ``Assistant.suggest`` as one batch and every human view to ``Human.respond`` as one batch.
A finished episode's place is refilled from the queue at once, so batches stay full.

Run folder (docs/design.md): ``config.json`` (the resolved config, the tokenizer that counted tokens
read/written, the tasks excluded and why), ``traces.jsonl`` (one line per finished episode, appended
and flushed as it finishes), ``summary.json`` (rebuilt from the traces by ``metrics.write_summary``).
``--resume`` skips the episodes already in ``traces.jsonl``, so an interrupted run continues and no
episode is counted twice. A resume may change only the fields declared ``resumable`` (speed, where
the run is written, ``limit``), and a ``limit`` only while every episode already played stays inside
the task set, so the summary and ``reproduce``'s done-check count the same episodes. Usage::

    empower eval --assistant smollm2-135m --policy base-n --n 10 --human reference --tasks humaneval
    run_eval(EvalConfig(assistant="smollm2-135m", tasks="humaneval", limit=16))  # -> Path of the run
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from empower import models
from empower.assistant import Assistant, AssistantConfig, SuggestionRequest, assistant_name, build_assistant
from empower.configs import option, part_of, resumable_fields, to_dict
from empower.engines.local import LocalEngine
from empower.engines.wrappers import Batcher, EngineStats, Turns, waiting
from empower.humans import Decision, Human, HumanConfig, HumanKind, HumanView, build_human
from empower.metrics import MetricsConfig, discounted_pass, read_traces, write_summary
from empower.sandbox import SandboxConfig, Status, run_many, validate_references, worker_count
from empower.tasks import TASK_SETS, Task, load_tasks

log = logging.getLogger(__name__)


class SimLoop(str, enum.Enum):
    LOCKSTEP = "lockstep"
    ASYNC = "async"


@dataclass
class EvalConfig(MetricsConfig, SandboxConfig, HumanConfig, AssistantConfig):
    """One evaluation run: an assistant, a simulated human, a problem set and the episode limits.

    The assistant, human, sandbox and metric fields are inherited from their own configs (declared
    once there), so ``empower eval --help`` lists them all and ``config.json`` holds them all.
    """

    tasks: str = option("humaneval", f"problem set: {' | '.join(TASK_SETS)}")
    tasks_path: str | None = option(
        None, "local file of the problem set (e.g. your own HumanEval-format JSONL)"
    )
    limit: int | None = option(None, "evaluate only the first N tasks", resumable=True)
    out: Path | None = option(
        None, "run folder; default runs/eval/<assistant>-<policy>-<human>-<tasks>", resumable=True
    )
    resume: bool = option(
        False, "continue the run in --out, skipping episodes already in traces.jsonl", resumable=True
    )
    sim_max_rounds: int = option(50, "turns per episode before it is cut off")
    sim_max_tokens: int = option(1024, "program length (counted tokens) at which an episode is cut off")
    sim_batch_size: int = option(
        8,
        "episodes in flight: stepped together (lockstep) or each on its own (async); their pending model "
        "calls go out as one batch",
        resumable=True,
    )
    sim_loop: SimLoop = option(
        SimLoop.LOCKSTEP,
        "lockstep: every live episode's turn waits for the slowest; async: each episode advances as soon "
        "as its own calls return",
        resumable=True,
    )
    sim_count_tokenizer: str = option(
        "",
        "the run's one tokenizer for effort: tokens read and written, and the human's K_H cap; empty: the "
        "assistant's (keep it fixed across compared runs)",
    )

    def __post_init__(self):
        for base in (AssistantConfig, HumanConfig, SandboxConfig, MetricsConfig):
            if hasattr(base, "__post_init__"):
                base.__post_init__(self)
        self.sim_loop = SimLoop(self.sim_loop)
        if self.tasks not in TASK_SETS:
            raise ValueError(f"tasks must be one of {', '.join(TASK_SETS)}, got {self.tasks!r}")
        for name in ("sim_max_rounds", "sim_max_tokens", "sim_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.out is None:
            name = assistant_name(self.part(AssistantConfig)).replace(":", "-")
            self.out = Path("runs/eval") / f"{name}-{getattr(self.human, 'value', self.human)}-{self.tasks}"
        self.out = Path(self.out)

    def part(self, cls):
        """The sub-config (AssistantConfig, HumanConfig, ...) holding this run's values of its fields."""
        return part_of(self, cls)

    @property
    def count_tokenizer(self) -> str:
        """The tokenizer that counts this run's effort: ``sim_count_tokenizer``, else the assistant's."""
        return self.sim_count_tokenizer or models.tokenizer_name(self.assistant)


class TokenCounter:
    """Counts tokens with one tokenizer for every run of a comparison (assistants' own tokenizers differ);
    the human's K_H cap counts with the same one."""

    def __init__(self, spec: str):
        self.spec = spec
        self.tokenizer = models.load_tokenizer(spec)

    def __call__(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]


@dataclass
class Episode:
    """The state and bookkeeping of one episode in flight."""

    task: Task
    state: str
    events: list[dict] = field(default_factory=list)
    turns: int = 0
    tokens_read: int = 0
    tokens_written: int = 0
    accepted: int = 0
    malformed: int = 0
    suggestion_tokens: list[int] = field(default_factory=list)
    suggestion_chars: list[int] = field(default_factory=list)
    human_answers: list[dict] = field(default_factory=list)
    end_reason: str | None = None
    accepted_spans: list[tuple[int, int]] = field(default_factory=list)  # where accepted text is in state
    chars_deleted: int = 0  # characters of accepted suggestions the human deleted

    def delete(self, chars: int) -> str:
        """Delete ``chars`` characters from the end of the program; returns them, and counts those
        that came from accepted suggestions (the human study's measure)."""
        if not 0 < chars <= len(self.state) - len(self.task.prompt):
            raise RuntimeError(
                f"{self.task.task_id}: the human deletes {chars} characters of a program with "
                f"{len(self.state) - len(self.task.prompt)} after the prompt"
            )
        cut = len(self.state) - chars
        removed, self.state = self.state[cut:], self.state[:cut]
        self.chars_deleted += sum(max(0, end - max(start, cut)) for start, end in self.accepted_spans)
        self.accepted_spans = [(start, min(end, cut)) for start, end in self.accepted_spans if start < cut]
        return removed

    def event(self, kind: str, text: str, tokens: int, **extra) -> None:
        self.events.append(
            {"turn": self.turns, "kind": kind, "text": text, "tokens": tokens, "chars": len(text), **extra}
        )


@dataclass
class RunStats:
    """Where the wall time of a run went (for the benchmark and the log)."""

    episodes: int = 0
    steps: int = 0
    total_s: float = 0.0
    assistant_s: float = 0.0
    human_s: float = 0.0
    sandbox_s: float = 0.0
    # role -> EngineStats: the async loop's Batchers (batches, rows, busy_seconds), servers (in flight)
    engines: dict = field(default_factory=dict)

    def add(self, other: RunStats) -> None:
        """Count ``other``'s episodes and call times in (the threads of the async loop)."""
        for name in ("episodes", "steps", "assistant_s", "human_s", "sandbox_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def other_s(self) -> float:
        """Time outside the assistant, human and sandbox calls: the loop's own bookkeeping."""
        return self.total_s - self.assistant_s - self.human_s - self.sandbox_s


@dataclass
class LoopStatus:
    """What the progress bar shows while episodes play (read as it redraws)."""

    live: int = 0  # episodes in flight
    in_call: int = 0  # lock-step: episodes whose model call is running
    turns: Turns | None = None  # async: its threads waiting for a model or the sandbox
    finished: int = 0
    start: float = field(default_factory=time.perf_counter)

    def line(self) -> str:
        minutes = (time.perf_counter() - self.start) / 60
        waiting = self.turns.waiting if self.turns is not None else self.in_call
        rate = f"{self.finished / minutes:.1f}" if self.finished else "-"
        return f"{self.live} live, {waiting} waiting on a call, {rate} episodes/min"


def _step(
    live: list[Episode],
    assistant: Assistant,
    human: Human,
    count: TokenCounter,
    config: EvalConfig,
    stats: RunStats,
) -> None:
    """One turn of every live episode: one batched assistant call, then one batched human call."""
    start = time.perf_counter()
    suggestions = assistant.suggest(
        [SuggestionRequest(state=e.state, statement=e.task.statement) for e in live]
    )
    stats.assistant_s += time.perf_counter() - start
    if len(suggestions) != len(live):
        raise RuntimeError(
            f"assistant {assistant.name} returned {len(suggestions)} suggestions for {len(live)} requests"
        )
    start = time.perf_counter()
    turns = human.respond(
        [
            HumanView(task=e.task, state=e.state, suggestion=s.text)
            for e, s in zip(live, suggestions, strict=True)
        ]
    )
    stats.human_s += time.perf_counter() - start
    if len(turns) != len(live):
        raise RuntimeError(f"human {human.name} returned {len(turns)} turns for {len(live)} views")
    suggestion_counts = count([s.text for s in suggestions])
    written_counts = count([t.written for t in turns])
    for episode, suggestion, shown_tokens, turn, written_tokens in zip(
        live, suggestions, suggestion_counts, turns, written_counts, strict=True
    ):
        episode.turns += 1
        if suggestion.text:
            episode.event("suggested", suggestion.text, shown_tokens, stop_reason=suggestion.stop_reason)
            episode.tokens_read += shown_tokens
            episode.suggestion_tokens.append(shown_tokens)
            episode.suggestion_chars.append(len(suggestion.text))
            if turn.decision is Decision.ACCEPT:
                episode.event("accepted", suggestion.text, shown_tokens)
                episode.accepted += 1
                episode.accepted_spans.append((len(episode.state), len(episode.state) + len(suggestion.text)))
                episode.state += suggestion.text
            elif turn.decision is Decision.REJECT:
                episode.event("rejected", "", 0)
        if turn.deleted:
            removed = episode.delete(turn.deleted)
            episode.event("deleted", removed, count([removed])[0])
        episode.malformed += bool(turn.malformed)
        if turn.raw is not None:
            episode.human_answers.append(
                {"turn": episode.turns, **{k: _bounded(v) for k, v in turn.raw.items()}}
            )
        if turn.written:
            episode.event(
                "wrote", turn.written, written_tokens, **({"malformed": True} if turn.malformed else {})
            )
            episode.tokens_written += written_tokens
            episode.state += turn.written
        if turn.decision is Decision.FINISH:
            episode.event("finished", "", 0)
            episode.end_reason = "finish"
        elif episode.turns >= config.sim_max_rounds:
            episode.end_reason = "max_rounds"
    for episode, length in zip(live, count([e.state for e in live]), strict=True):
        if episode.end_reason is None and length >= config.sim_max_tokens:
            episode.end_reason = "max_tokens"
    stats.steps += 1


# The most characters of one human answer kept in a trace: enough to audit a decision (answers are
# bounded by the human's generation budget anyway), never a trace that grows without bound.
MAX_ANSWER_CHARS = 4000


def _bounded(text):
    if not isinstance(text, str) or len(text) <= MAX_ANSWER_CHARS:
        return text
    return text[:MAX_ANSWER_CHARS] + f"... [{len(text) - MAX_ANSWER_CHARS} more characters]"


def _trace(episode: Episode, result, assistant: Assistant, human: Human, config: EvalConfig) -> dict:
    passed = result.status is Status.PASSED
    return {
        "task_id": episode.task.task_id,
        "assistant": assistant.name,
        "human": human.name,
        "events": episode.events,
        "program": episode.state,
        "status": result.status.value,
        "message": result.message[:2000],
        "passed": passed,
        "tokens_read": episode.tokens_read,
        "tokens_written": episode.tokens_written,
        "suggestions": len(episode.suggestion_tokens),
        "accepted": episode.accepted,
        "suggestion_tokens": episode.suggestion_tokens,
        "suggestion_chars": episode.suggestion_chars,
        "chars_deleted_from_accepted": episode.chars_deleted,
        "dpr": discounted_pass(passed, episode.tokens_read, episode.tokens_written, config),
        "turns": episode.turns,
        "end_reason": episode.end_reason,
        "malformed_human_answers": episode.malformed,
        # Per turn, what the human decided from, to audit it: the LLM human's own words, the plausible
        # human's surprise and chance (nothing for the reference human).
        "human_answers": episode.human_answers,
    }


def run_episodes(
    tasks: list[Task],
    assistant: Assistant,
    human: Human,
    config: EvalConfig,
    count: TokenCounter,
    on_finished: Callable[[dict], None],
    status: LoopStatus | None = None,
) -> RunStats:
    """Play one episode per task, ``sim_batch_size`` at a time; call ``on_finished(trace)`` per episode.

    The programs of the episodes that finish in a step are tested together in the sandbox (worker
    pool) right away, so a trace is handed over, and saved, as soon as its episode is scored.
    """
    status = status if status is not None else LoopStatus()
    stats, concurrent = RunStats(), config.sim_loop is SimLoop.ASYNC
    begin = time.perf_counter()
    with _shared_engines(assistant, human, config, stats.engines, share=concurrent):
        play = _run_async if concurrent else _run_lockstep
        play(tasks, assistant, human, config, count, on_finished, status, stats)
    stats.total_s = time.perf_counter() - begin
    return stats


def _run_lockstep(tasks, assistant, human, config, count, on_finished, status, stats) -> None:
    """Step every live episode together: one call per role for all of them, then the sandbox."""
    queue, live = deque(tasks), []

    while queue or live:
        while queue and len(live) < config.sim_batch_size:
            task = queue.popleft()
            live.append(Episode(task=task, state=task.prompt))
        status.live = status.in_call = len(live)
        _step(live, assistant, human, count, config, stats)
        status.in_call = 0
        finished = [e for e in live if e.end_reason]
        live = [e for e in live if not e.end_reason]
        status.live = len(live)
        if finished:
            start = time.perf_counter()
            results = run_many([(e.task, e.state) for e in finished], config.part(SandboxConfig))
            stats.sandbox_s += time.perf_counter() - start
            for episode, result in zip(finished, results, strict=True):
                on_finished(_trace(episode, result, assistant, human, config))
                stats.episodes += 1
                status.finished += 1


def _run_async(tasks, assistant, human, config, count, on_finished, status, stats) -> None:
    """Each episode on its own thread, ``sim_batch_size`` in flight.

    Episodes take turns running Python (:class:`Turns`: no tokenizer or counter is shared across
    threads at once) and give their turn up while they wait for a model or the sandbox, so their
    calls overlap: in-process models gather the calls waiting for them into one generate call
    (:class:`Batcher`), servers get them as concurrent requests. The first error stops the others at
    their next turn; the traces of finished episodes are saved already.
    """
    turns, stop = Turns(), threading.Event()
    status.turns = turns
    sandboxes = threading.Semaphore(worker_count(config.part(SandboxConfig)))

    def play(task: Task) -> RunStats:
        mine = RunStats()
        with turns.turn():
            status.live += 1
            try:
                episode = Episode(task=task, state=task.prompt)
                while not episode.end_reason:
                    if stop.is_set():
                        return mine
                    _step([episode], assistant, human, count, config, mine)
                start = time.perf_counter()
                with waiting(), sandboxes:
                    [result] = run_many([(task, episode.state)], config.part(SandboxConfig))
                mine.sandbox_s += time.perf_counter() - start
                on_finished(_trace(episode, result, assistant, human, config))
                mine.episodes += 1
                status.finished += 1
            finally:
                status.live -= 1
        return mine

    with ThreadPoolExecutor(config.sim_batch_size, thread_name_prefix="episode") as threads:
        futures = [threads.submit(play, task) for task in tasks]
        try:
            for future in futures:
                stats.add(future.result())
        except BaseException:
            stop.set()
            threads.shutdown(cancel_futures=True)
            raise


def _engine_owners(assistant: Assistant, human: Human, config: EvalConfig) -> list[tuple]:
    """(role, owner, attribute, batch rows) of every engine a run may call: ``getattr(owner,
    attribute)`` is the engine, or None where that role has none (a scripted human, no estimator)."""
    return [
        ("assistant", assistant, "engine", config.assistant_batch_size),
        ("estimator", assistant, "estimator", config.assistant_batch_size),
        ("human", getattr(human, "backend", None), "engine", config.human_batch_size),
    ]


def check_context(assistant: Assistant, human: Human, config: EvalConfig) -> None:
    """Refuse, before any episode, a run whose longest request cannot fit an engine's context.

    An episode's program grows to ``sim_max_tokens`` and every prompt holds it, plus the reply's
    budget; a server with a shorter ``max_model_len`` (vLLM's ``--max-model-len``) would refuse the
    request hours into the run. Counted with the run's tokenizer: a lower bound, not exact.
    """
    replies = {"assistant": ("max_new_tokens", config.max_new_tokens),
               "estimator": ("max_new_tokens", config.max_new_tokens),
               "human": ("human_max_new_tokens", config.human_max_new_tokens)}  # fmt: skip
    for role, owner, name, _ in _engine_owners(assistant, human, config):
        engine = getattr(owner, name, None)
        context = getattr(engine, "max_model_len", None)
        field, reply = replies[role]
        if context and config.sim_max_tokens + reply > context:
            raise ValueError(
                f"the {role}'s engine ({getattr(engine, 'name', '') or type(engine).__name__}) takes "
                f"{context} tokens of context, but a program may grow to sim_max_tokens="
                f"{config.sim_max_tokens} and a reply adds up to {field}={reply}: lower sim_max_tokens or "
                f"serve the model with a longer context (vLLM: --max-model-len)"
            )


@contextlib.contextmanager
def _shared_engines(assistant: Assistant, human: Human, config: EvalConfig, counters: dict, share: bool):
    """While the episodes play, every in-process engine of the run behind a :class:`Batcher` when
    ``share`` (the async loop: the calls of episodes on other threads are gathered into its generate
    calls), restored after; then each engine's counters (batches, requests in flight, retries, ...)
    go into ``counters`` by role."""
    owners = _engine_owners(assistant, human, config)
    swapped = []
    for role, owner, name, rows in owners:
        engine = getattr(owner, name, None)
        if share and isinstance(engine, LocalEngine):
            setattr(owner, name, Batcher(engine, max_batch_rows=rows, batch_wait_s=0.002))
            swapped.append((role, owner, name, engine))
    try:
        yield
    finally:
        for role, owner, name, engine in swapped:
            batcher = getattr(owner, name)
            batcher.close()
            counters[role] = batcher.stats
            setattr(owner, name, engine)
        for role, owner, name, _ in owners:
            if isinstance(stats := getattr(getattr(owner, name, None), "stats", None), EngineStats):
                counters[role] = stats


def exclude_broken_references(tasks: list[Task], config: EvalConfig) -> tuple[list[Task], list[dict]]:
    """Tasks a human who intends the reference cannot play: no reference, or one that fails its own
    tests in the sandbox. Returns (kept, excluded with reasons) so the run can report them."""
    missing = [t for t in tasks if not t.reference]
    kept, failing = validate_references([t for t in tasks if t.reference], config.part(SandboxConfig))
    excluded = [{"task_id": t.task_id, "reason": "no reference solution"} for t in missing]
    excluded += [
        {"task_id": t.task_id, "reason": f"reference {r.status.value}: {r.message[:200]}"} for t, r in failing
    ]
    return kept, excluded


def _needs_reference(config: EvalConfig) -> bool:
    return HumanKind(config.human).intends_reference


def _prepare_folder(config: EvalConfig) -> tuple[set[str], dict | None]:
    """Check the run folder against ``--resume``; returns (task ids already done, saved config)."""
    out = config.out
    traces_path, config_path = out / "traces.jsonl", out / "config.json"
    has_traces = traces_path.is_file() and traces_path.stat().st_size > 0
    if not config.resume:
        if has_traces:
            raise ValueError(
                f"run folder {out} already holds episodes ({traces_path}); "
                "pass --resume to continue it, or choose another --out"
            )
        return set(), None
    if not config_path.is_file():
        if has_traces:
            raise ValueError(f"cannot resume {out}: {traces_path} exists but {config_path} does not")
        return set(), None
    saved = json.loads(config_path.read_text())
    current = to_dict(config)
    may_change = resumable_fields(EvalConfig)
    # A field added since the run was made is unchanged at its default.
    missing = {k: v for k, v in to_dict(EvalConfig()).items() if k not in saved}
    saved = {**missing, **saved}
    # The tokenizer that counted, not how it was named: "" (the assistant's) may be the one a run named.
    saved["sim_count_tokenizer"] = saved.get("count_tokenizer", saved.get("sim_count_tokenizer"))
    current["sim_count_tokenizer"] = config.count_tokenizer
    changed = sorted(k for k in current if k not in may_change and saved.get(k) != current[k])
    if changed:
        detail = "; ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise ValueError(f"cannot resume {out} with a different configuration ({detail})")
    if not has_traces:
        return set(), saved
    text = traces_path.read_text()
    if not text.endswith("\n"):  # torn last line of a killed run: drop it, that episode runs again
        with open(traces_path, "r+") as f:
            f.truncate(text.rfind("\n") + 1)
    return {t["task_id"] for t in read_traces(traces_path)}, saved


def _check_played_inside(done: set[str], tasks: list[Task], config: EvalConfig) -> None:
    """Refuse a resume whose task set (a smaller ``limit``) leaves out episodes already played: the
    summary and the done-check of ``reproduce`` would then count different episodes."""
    outside = done - {t.task_id for t in tasks}
    if not outside:
        return
    position = {t.task_id: i for i, t in enumerate(load_tasks(config.tasks, path=config.tasks_path))}
    needed = max(position.get(task_id, -1) for task_id in outside) + 1  # 0: not in the problem file any more
    keep = f"resume with --limit {needed} or more" if needed else "resume on the tasks it was played on"
    raise ValueError(
        f"cannot resume {config.out} with limit={config.limit}: {config.out / 'traces.jsonl'} already holds "
        f"{len(outside)} episode(s) of tasks outside that set ({', '.join(sorted(outside)[:5])}); "
        f"{keep}, or choose another --out"
    )


def run_eval(config: EvalConfig, progress: bool = True, pool: models.ModelPool | None = None) -> Path:
    """Evaluate ``config.assistant`` with ``config.human`` on ``config.tasks``; returns the run folder.

    Args:
        config: the run (see :class:`EvalConfig`); ``config.out`` is created if needed.
        progress: show a progress bar (episodes done, Pass@1 and acceptance so far) on stderr.
        pool: where the models are loaded; the assistant, its estimator and the human share what
            they have in common (a grid passes one pool to keep its human loaded across runs).

    Returns:
        the run folder with config.json, traces.jsonl and summary.json.
    """
    done, saved = _prepare_folder(config)
    tasks = load_tasks(config.tasks, path=config.tasks_path, limit=config.limit)
    _check_played_inside(done, tasks, config)
    excluded: list[dict] = []
    if _needs_reference(config):
        # Tasks excluded before stay excluded and played ones passed the check; the rest (new tasks of
        # a larger limit among them) are checked now.
        ids = {t.task_id for t in tasks}
        excluded = [e for e in (saved or {}).get("excluded_tasks", []) if e["task_id"] in ids]
        known = done | {e["task_id"] for e in excluded}
        kept, newly = exclude_broken_references([t for t in tasks if t.task_id not in known], config)
        excluded += newly
        playable = {t.task_id for t in kept} | done
        tasks = [t for t in tasks if t.task_id in playable]
        if excluded:
            log.warning(
                "excluded %d task(s) whose reference is missing or fails its own tests: %s",
                len(excluded),
                ", ".join(e["task_id"] for e in excluded[:10]),
            )
    if not tasks:
        raise ValueError(f"no task left to evaluate in {config.tasks} (excluded: {len(excluded)})")
    count = TokenCounter(config.count_tokenizer)
    config.out.mkdir(parents=True, exist_ok=True)
    record = {
        **to_dict(config),
        "count_tokenizer": count.spec,
        "n_tasks": len(tasks),
        "excluded_tasks": excluded,
    }
    (config.out / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    todo = [t for t in tasks if t.task_id not in done]
    log.info(
        "%s: %d task(s), %d already done, %d to run",
        config.out,
        len(tasks),
        len(tasks) - len(todo),
        len(todo),
    )
    if todo:
        stats = _play(
            todo,
            config,
            count,
            pool if pool is not None else models.ModelPool(),
            already_done=len(tasks) - len(todo),
            total=len(tasks),
            progress=progress,
        )
        log.info(
            "%d episode(s) in %.1fs: assistant %.1fs, human %.1fs, sandbox %.1fs, other %.1fs",
            stats.episodes,
            stats.total_s,
            stats.assistant_s,
            stats.human_s,
            stats.sandbox_s,
            stats.other_s,
        )
        # Where this invocation's time went (a resumed run keeps only its last invocation's).
        (config.out / "speed.json").write_text(json.dumps(dataclasses.asdict(stats), indent=2) + "\n")
    write_summary(config.out)
    return config.out


def _play(
    todo: list[Task],
    config: EvalConfig,
    count: TokenCounter,
    pool: models.ModelPool,
    *,
    already_done: int,
    total: int,
    progress: bool,
) -> RunStats:
    """Build the assistant and human, run the episodes, append each trace as it finishes."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.text import Text

    status = LoopStatus()

    class StatusColumn(ProgressColumn):
        def render(self, task) -> Text:
            return Text(status.line(), style="dim")

    assistant = build_assistant(config.part(AssistantConfig), pool=pool)
    human = build_human(config.part(HumanConfig), pool=pool, counter=count.tokenizer)
    check_context(assistant, human, config)
    totals = {"passed": 0, "shown": 0, "accepted": 0, "done": 0}
    bar = Progress(
        TextColumn("[bold]eval"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        StatusColumn(),
        console=Console(stderr=True),
        disable=not progress,
    )
    with open(config.out / "traces.jsonl", "a") as traces, bar:
        job = bar.add_task("", total=total, completed=already_done)

        def on_finished(trace: dict) -> None:
            traces.write(json.dumps(trace) + "\n")
            traces.flush()
            os.fsync(traces.fileno())
            totals["done"] += 1
            totals["passed"] += trace["passed"]
            totals["shown"] += trace["suggestions"]
            totals["accepted"] += trace["accepted"]
            acceptance = totals["accepted"] / totals["shown"] if totals["shown"] else float("nan")
            bar.update(
                job,
                advance=1,
                description=f"pass {totals['passed'] / totals['done']:.2f} acceptance {acceptance:.2f}",
            )

        return run_episodes(todo, assistant, human, config, count, on_finished, status)
