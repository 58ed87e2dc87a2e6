"""``empower reproduce --config X --check``: resolve a whole experiment before any of its hours run.

Everything a grid needs is looked up without running it: every model spec (embedded name, local
folder, or hub id in the local cache or, with network, on the hub), every simulated-human server,
every task set (loaded and counted, with its release selection), the training corpus (documents
counted). Then the plan: each stage, its runs and episodes, and a cost estimate from the rates
measured in ``docs/benchmarks.md``. What does not resolve is listed by name with the reason; the
command exits 1 when anything but a server (which may start later) is missing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from empower import models
from empower.experiment import (
    _DATA,
    LABELS,
    CalibrationPolicy,
    GridMethod,
    ReproduceConfig,
    base_model,
    calibration_human,
    data_config,
    entry_label,
    estimator,
    eval_fields,
    train_config,
)
from empower.humans import HumanServerApi

BENCHMARKS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"


@dataclass
class Item:
    """One thing the config names, and whether it resolved."""

    kind: str  # model, server, tasks, corpus
    name: str
    used_by: str
    ok: bool
    detail: str
    fatal: bool = True  # a server may be started after the check: not fatal


@dataclass
class Check:
    items: list[Item] = field(default_factory=list)
    tasks: dict[str, int] = field(default_factory=dict)  # task set label -> problems
    references: dict[str, int] = field(default_factory=dict)  # task set label -> with a reference
    documents: int | None = None

    def add(self, kind: str, name: str, used_by: str, probe: Callable[[], str], fatal: bool = True) -> bool:
        try:
            detail, ok = probe(), True
        except Exception as err:  # each probe's own failure is the finding; keep checking the rest
            detail, ok = f"{type(err).__name__}: {err}", False
        self.items.append(Item(kind, name, used_by, ok, detail, fatal))
        return ok

    @property
    def passed(self) -> bool:
        return all(item.ok for item in self.items if item.fatal)


def resolve_model(spec: str) -> str:
    """Where a model spec is: an embedded name, a local path, or a hub id (cache, else the hub)."""
    path = models.resolve(spec)
    if Path(path).exists():
        return f"local: {path}"
    import huggingface_hub
    from huggingface_hub import constants

    if isinstance(huggingface_hub.try_to_load_from_cache(path, "config.json"), str):
        return "hub id, in the local cache"
    if constants.HF_HUB_OFFLINE:
        raise LookupError(
            f"hub id {path} is not in the local cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set"
        )
    try:
        huggingface_hub.HfApi().model_info(path, timeout=10)
    except Exception as err:
        raise LookupError(
            f"hub id {path} is not in the local cache, and the hub did not answer ({err})"
        ) from err
    return "hub id, on the hub (downloaded at first use)"


def _server(url: str, name: str) -> str:
    from empower.engines.openai import served_model

    return f"serves {served_model(url, name, timeout_s=5)!r}"


def _tasks(fields, check: Check, label: str | None) -> Callable[[], str]:
    def probe() -> str:
        from empower.tasks import load_tasks

        tasks = load_tasks(fields.tasks, fields.tasks_path, fields.limit)
        references = sum(t.reference is not None for t in tasks)
        if label is not None:
            check.tasks[label], check.references[label] = len(tasks), references
        kinds = sorted({t.test_type.value for t in tasks})
        return f"{len(tasks)} problems ({', '.join(kinds)}), {references} with a reference solution"

    return probe


def resolve(config: ReproduceConfig) -> Check:
    """Look up every model, server, task set and the corpus of ``config`` (nothing runs)."""
    check = Check()
    trained = [m for m in config.grid.methods if m in _DATA]
    uses = {}  # model spec -> roles
    if trained or any(m not in _DATA for m in config.grid.methods):
        uses.setdefault(base_model(config), []).append("train.base / base assistants")
    if trained or GridMethod.THRESHOLD in config.grid.methods:
        uses.setdefault(estimator(config), []).append("data.estimator")
    if config.eval.get("sim_count_tokenizer"):
        uses.setdefault(str(config.eval["sim_count_tokenizer"]), []).append("eval.sim_count_tokenizer")
    for human in config.grid.humans:
        fields = eval_fields(config.eval, human, where="grid.humans")
        label = f"human {entry_label(human, 'humans')}"
        if fields.human_url:
            check.add(
                "server",
                fields.human_url,
                label,
                lambda f=fields: _server(f.human_url, f.human_served_model),
                fatal=False,
            )
        if fields.human.has_model and not (
            fields.human_url and fields.human_server_api is HumanServerApi.CHAT
        ):
            uses.setdefault(fields.human_model, []).append(label)
    for spec, roles in uses.items():
        check.add("model", spec, ", ".join(roles), lambda s=spec: resolve_model(s))
    for task_set in config.grid.task_sets:
        fields = eval_fields(config.eval, task_set, where="grid.task_sets")
        label = entry_label(task_set, "task_sets")
        check.add("tasks", f"{fields.tasks} {fields.tasks_path or '(default source)'}", f"task set {label}",
                  _tasks(fields, check, label))  # fmt: skip
    seen: set[tuple[str, str]] = set()  # (task set, human): one finding per pair, not per method
    for task_set, human, _ in config.grid.cells():
        label, who = entry_label(task_set, "task_sets"), entry_label(human, "humans")
        kind = eval_fields(config.eval, human, where="grid.humans").human
        if kind.intends_reference and check.references.get(label) == 0 and (label, who) not in seen:
            seen.add((label, who))
            check.items.append(Item("cell", f"{who} on {label}", "grid.task_sets", False,
                                    f"human {who} writes reference solutions, and task set {label} has none: "
                                    "every task would be excluded (give the task set a humans: list without it)"))  # fmt: skip
    if config.grid.eta is None and config.calibration is not None:
        calib = config.calibration
        fields = eval_fields(
            config.eval, config.calibration_task_set(), {"limit": calib.size}, where="calibration"
        )
        check.add(
            "tasks",
            f"{calib.tasks} {calib.tasks_path or '(default source)'}",
            "calibration",
            _tasks(fields, check, None),
        )
        check.add(
            "human",
            calib.human or "(the first)",
            "calibration.human",
            lambda: entry_label(calibration_human(config), "humans"),
        )
    if trained or (
        config.grid.eta is None
        and config.calibration
        and config.calibration.policy is CalibrationPolicy.EMPOWER
    ):
        data = data_config(config, GridMethod.EMPOWER, config.grid.eta or 1.0)

        def corpus() -> str:
            from empower.corpus import iter_documents

            check.documents = sum(1 for _ in iter_documents(data))
            if not check.documents:
                raise LookupError("the corpus holds no document after its filters")
            return f"{check.documents} documents"

        check.add("corpus", str(data.corpus), "data", corpus)
    return check


# ------------------------------------------------------------------------------------ the plan


def measured_rates(path: Path = BENCHMARKS) -> dict[str, float]:
    """Rates this machine measured (``docs/benchmarks.md``): episodes/min with the reference and the
    LLM human, labeling and training tokens/s. Missing ones are left out."""
    if not path.is_file():
        return {}
    text = path.read_text()
    patterns = {
        "reference_episodes_per_min": r"\| batched \| \d+ \| \d+ \| \d+ \| [\d.]+ \| ([\d.]+) \|",
        "llm_episodes_per_min": r"\| base-n \| lockstep \| ([\d.]+) \|",
        "labeling_tokens_per_s": r"\| labeling, end to end \| [\d.]+ \| ([\d.]+) \|",
        "train_tokens_per_s": r"\| LoRA, padding-free batches \(default\) \| ([\d.]+) \|",
    }
    rates = {}
    for name, pattern in patterns.items():
        match = re.search(pattern, text)
        if match:
            rates[name] = float(match.group(1))
    return rates


@dataclass
class Stage:
    kind: str
    name: str
    work: str
    hours: float | None


def _hours(amount: float, per_second: float | None) -> float | None:
    return amount / per_second / 3600 if per_second else None


def plan(config: ReproduceConfig, check: Check, rates: dict[str, float]) -> list[Stage]:
    """Each stage of the grid with its work and, where a measured rate applies, its hours here."""
    stages = []
    trained = [m for m in config.grid.methods if m in _DATA]
    eta = config.grid.eta or 1.0
    documents = check.documents
    for index, method in enumerate(trained):
        data = data_config(config, method, eta)
        cuts = (documents or 0) * data.cuts_per_doc
        # At most corpus_max_chars per document, ~4 characters a token; the estimator scores each
        # document once for the whole grid (the score cache), so only the first build pays for it.
        tokens = data.corpus_max_chars * (documents or 0) / 4 if index == 0 else 0
        stages.append(Stage("data", LABELS[method], f"{documents if documents is not None else '?'} documents, {cuts} cuts",
                            _hours(tokens, rates.get("labeling_tokens_per_s")) if documents else None))  # fmt: skip
    for method in trained:
        train = train_config(config, method, config.out / "data")
        sequences = (train.max_steps or 0) * train.batch_size
        stages.append(Stage("train", LABELS[method], f"{train.max_steps} steps x {train.batch_size} sequences (<= {train.max_length} tokens)",
                            _hours(sequences * train.max_length, rates.get("train_tokens_per_s"))))  # fmt: skip
    for task_set, human, method in config.grid.cells():
        label = entry_label(task_set, "task_sets")
        episodes = check.tasks.get(label)
        kind = eval_fields(config.eval, human, where="grid.humans").human
        rate = rates.get("reference_episodes_per_min" if not kind.has_model else "llm_episodes_per_min")
        stages.append(Stage("eval", f"{LABELS[method]} / {entry_label(human, 'humans')} / {label}",
                            f"{episodes if episodes is not None else '?'} episodes",
                            _hours(episodes * 60, rate) if episodes is not None else None))  # fmt: skip
    if config.grid.eta is None and config.calibration:
        calib = config.calibration
        stages.append(Stage("calibration", f"{len(calib.etas)} etas ({calib.policy.value})",
                            f"{calib.stage_count} stages, {calib.size} episodes per eta", None))  # fmt: skip
    return stages


def report(config: ReproduceConfig, console: Console | None = None) -> bool:
    """Print what resolved, what did not, and the plan; True when nothing fatal is missing."""
    console = console or Console()
    check = resolve(config)
    table = Table(title=f"What {config.out} needs")
    for column in ("kind", "name", "used by", "status"):
        table.add_column(column, overflow="fold")
    for item in check.items:
        status = (
            f"[green]ok[/] {item.detail}"
            if item.ok
            else f"[{'red' if item.fatal else 'yellow'}]not resolved[/] {item.detail}"
        )
        table.add_row(item.kind, item.name, item.used_by, status)
    console.print(table)
    rates = measured_rates()
    stages = plan(config, check, rates)
    table = Table(title="The plan (finished stages are skipped when the run resumes)")
    for column in ("stage", "run", "work", "hours here (data, train: at most)"):
        table.add_column(column, overflow="fold")
    for stage in stages:
        table.add_row(
            stage.kind, stage.name, stage.work, f"{stage.hours:.2f}" if stage.hours is not None else "-"
        )
    console.print(table)
    known = [s.hours for s in stages if s.hours is not None]
    episodes = sum(int(s.work.split()[0]) for s in stages if s.kind == "eval" and s.work[0].isdigit())
    console.print(
        f"{len(stages)} stages, {episodes} episodes; about {sum(known):.1f} hours at the rates measured in "
        f"{BENCHMARKS.name} (2 CPU cores, SmolLM2-135M: a bound for this machine only; for GPUs see its "
        "derivation of the paper's grid)"
        if rates
        else f"{len(stages)} stages, {episodes} episodes; no measured rates found"
    )
    missing = [item for item in check.items if not item.ok]
    if missing:
        console.print(f"[bold]{len(missing)} not resolved:[/]")
        for item in missing:
            console.print(f"  {item.kind} {item.name} ({item.used_by}): {item.detail}"
                          + ("" if item.fatal else "  (start it before the run)"))  # fmt: skip
    console.print("[green]check passed[/]" if check.passed else "[red]check failed[/]")
    return check.passed
