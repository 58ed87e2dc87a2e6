"""The experiment grid's config and its stages, shared by ``reproduce`` and ``calibration``.

:class:`ReproduceConfig` (the data/train/eval sections, the grid, the calibration), the config of
each stage of one grid cell (:func:`data_config`, :func:`train_config`, :func:`eval_config`), how a
finished stage is recognised on disk (:func:`data_done`, :func:`model_done`, :func:`eval_done`), and
:class:`Stages`, which runs a stage unless it is done and times it. ``reproduce`` runs the grid and
``calibration`` the eta sweep; both build on this module, and neither imports the other's runner.
"""

from __future__ import annotations

import enum
import json
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from empower.configs import config_from_dict, option, to_dict

console = Console(stderr=True)


class GridMethod(str, enum.Enum):
    EMPOWER = "empower"
    SFT_10 = "sft-10"
    SFT_20 = "sft-20"
    SFT_RAND = "sft-rand-1-30"
    BASE = "base"
    BASE_10 = "base-10"
    BASE_20 = "base-20"
    THRESHOLD = "threshold"


LABELS = {
    GridMethod.EMPOWER: "Empower",
    GridMethod.SFT_10: "SFT-10",
    GridMethod.SFT_20: "SFT-20",
    GridMethod.SFT_RAND: "SFT-RAND-1-30",
    GridMethod.BASE: "Base",
    GridMethod.BASE_10: "Base-10",
    GridMethod.BASE_20: "Base-20",
    GridMethod.THRESHOLD: "Threshold",
}
# DataConfig settings of each trained method (the rest of DataConfig is shared: same corpus, cuts, seed).
_DATA = {
    GridMethod.EMPOWER: {"method": "empower"},
    GridMethod.SFT_10: {"method": "sft", "sft_n": 10},
    GridMethod.SFT_20: {"method": "sft", "sft_n": 20},
    GridMethod.SFT_RAND: {"method": "sft-rand", "sft_rand_min": 1, "sft_rand_max": 30},
}
# AssistantConfig settings of the untrained methods.
_POLICY = {
    GridMethod.BASE: {"policy": "base"},
    GridMethod.BASE_10: {"policy": "base-n", "n": 10},
    GridMethod.BASE_20: {"policy": "base-n", "n": 20},
    GridMethod.THRESHOLD: {"policy": "threshold"},
}
# Fields each section may not set: the grid sets them per method, run and folder.
_OWNED = {
    "data": {"out", "method", "eta", "sft_n", "sft_rand_min", "sft_rand_max", "resume", "overwrite"},
    "train": {"data", "out", "resume", "overwrite"},
    "eval": {"assistant", "policy", "n", "eta", "estimator", "out", "resume"},
}


class CalibrationPolicy(str, enum.Enum):
    THRESHOLD = "threshold"  # training-free threshold decoding per eta: one evaluation run each
    EMPOWER = "empower"  # build data, train and evaluate an Empower assistant per eta (costly)


@dataclass
class GridConfig:
    """Which methods are compared, with which humans, on which task sets."""

    methods: list[GridMethod] = option(list(GridMethod), "methods to compare (default: all eight)")
    eta: float | None = option(
        0.32, "Empower / threshold eta in BITS; null: calibrate first and use its choice"
    )
    humans: list[dict] = option(
        [{"human": "reference"}],
        "one entry per simulated human: EvalConfig human_* fields (human, human_model, human_url, ...) "
        "and an optional label",
    )
    task_sets: list[dict] = option(
        [{"tasks": "humaneval"}],
        "one entry per task set: tasks, tasks_path, limit, an optional label, and optionally humans: the "
        "labels of the humans that play it (e.g. the reference human needs reference solutions)",
    )

    def __post_init__(self):
        self.methods = [GridMethod(m) for m in self.methods]
        if not self.methods:
            raise ValueError(
                "grid.methods is empty; name at least one of " + ", ".join(m.value for m in GridMethod)
            )
        if self.eta is not None and not self.eta > 0:
            raise ValueError(f"grid.eta must be > 0 bits (or null to calibrate), got {self.eta}")
        for name in ("humans", "task_sets"):
            entries = getattr(self, name)
            if not entries or not all(isinstance(e, dict) for e in entries):
                raise ValueError(f"grid.{name} must be a non-empty list of mappings, got {entries!r}")
            labels = [entry_label(e, name) for e in entries]
            if len(set(labels)) != len(labels):
                raise ValueError(f"grid.{name}: labels {labels} repeat; give each entry a distinct 'label'")
        known = {entry_label(h, "humans") for h in self.humans}
        for task_set in self.task_sets:
            unknown = sorted(set(task_set.get("humans", known)) - known)
            if unknown:
                raise ValueError(
                    f"grid.task_sets ({entry_label(task_set, 'task_sets')}): humans {unknown} are not "
                    f"grid humans; labels: {', '.join(sorted(known))}"
                )

    def cells(self) -> list[tuple[dict, dict, GridMethod]]:
        """(task set, human, method) of every evaluation run, task sets outermost."""
        return [
            (t, h, m)
            for t in self.task_sets
            for h in self.humans
            if entry_label(h, "humans") in t.get("humans", [entry_label(h, "humans")])
            for m in self.methods
        ]


@dataclass
class CalibrationConfig:
    """How eta is chosen: a sweep on validation tasks, scored by DPR with one simulated human."""

    etas: list[float] = option([0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0], "eta values (bits) to try")
    policy: CalibrationPolicy = option(CalibrationPolicy.THRESHOLD, "threshold (no training) or empower")
    human: str = option("", "label of the grid human to calibrate with (default: the first)")
    tasks: str = option("humaneval", "validation problem set")
    tasks_path: str | None = option(None, "file of the validation problem set")
    size: int = option(20, "validation tasks: the first SIZE tasks of the set that no evaluation run uses")

    def __post_init__(self):
        self.policy = CalibrationPolicy(self.policy)
        if len(self.etas) < 2 or any(not eta > 0 for eta in self.etas):
            raise ValueError(f"calibration.etas needs at least two positive values (bits), got {self.etas}")
        if self.size < 2:
            raise ValueError(f"calibration.size must be >= 2 tasks (a CI needs two), got {self.size}")

    @property
    def stage_count(self) -> int:
        """Stages of the sweep: an evaluation per eta, plus a data build and a training run with empower."""
        return (3 if self.policy is CalibrationPolicy.EMPOWER else 1) * len(self.etas)


@dataclass
class ReproduceConfig:
    """One experiment: shared stage settings plus the grid; YAML sections data/train/eval/grid/calibration."""

    out: Path = option(Path("runs/reproduce"), "the run folder everything is written under")
    data: dict = option(
        {},
        "empower.labeling.DataConfig fields shared by all training sets (corpus_*, estimator, "
        "cuts_per_doc, seed, ...)",
    )
    train: dict = option(
        {},
        "empower.train.TrainConfig fields shared by all trained methods (base, max_steps, "
        "lr, lora_*, ...); max_steps is required so every method trains equally long",
    )
    eval: dict = option(
        {}, "empower.env.EvalConfig fields shared by all runs (sim_*, sandbox_*, dpr_*, max_new_tokens, ...)"
    )
    data_fallback: dict = option(
        {},
        "data fields used instead of data's corpus_* settings when data.corpus names "
        "a path that does not exist (e.g. {corpus: stdlib}: the offline default)",
    )
    grid: GridConfig = option(default_factory=GridConfig, help="methods, eta, humans and task sets")
    calibration: CalibrationConfig | None = option(None, "how to choose eta (needed when grid.eta is null)")
    report: bool = option(True, "write the report at the end")

    def __post_init__(self):
        self.out = Path(self.out)
        if isinstance(self.grid, dict):
            self.grid = config_from_dict(GridConfig, self.grid, where="grid")
        if isinstance(self.calibration, dict):
            self.calibration = config_from_dict(CalibrationConfig, self.calibration, where="calibration")
        for section, owned in {**_OWNED, "data_fallback": _OWNED["data"]}.items():
            values = getattr(self, section)
            if not isinstance(values, dict):
                raise ValueError(f"{section}: expected a mapping of fields, got {values!r}")
            clash = sorted(owned & set(values))
            if clash:
                raise ValueError(f"{section}: {', '.join(clash)} are set by the grid per method; remove them")
        corpus = str(self.data.get("corpus", "stdlib"))
        if self.data_fallback and corpus != "stdlib" and not Path(corpus).exists():
            console.print(
                f"[yellow]data.corpus {corpus} does not exist; using data_fallback {self.data_fallback}[/]"
            )
            kept = {k: v for k, v in self.data.items() if not k.startswith("corpus")}
            self.data, self.data_fallback = {**kept, **self.data_fallback}, {}
        if self.grid.eta is None and self.calibration is None:
            raise ValueError("grid.eta is null (calibrate) but there is no calibration section")
        if any(m in _DATA for m in self.grid.methods) and not self.train.get("max_steps"):
            raise ValueError(
                "train.max_steps is required: every trained method gets the same number of steps"
            )
        self.validate()

    def validate(self) -> None:
        """Build every stage config once, so unknown keys and impossible values fail before any work."""
        eta = self.grid.eta or 1.0
        for method in self.grid.methods:
            if method in _DATA:
                data = data_config(self, method, eta)
                train_config(self, method, data.out)
        for task_set, human, method in self.grid.cells():
            eval_config(self, method, human, task_set, eta)
        if self.calibration:
            calibration_human(self)
            eval_fields(self.eval, self.calibration_task_set(), where="calibration")

    def calibration_task_set(self) -> dict:
        assert self.calibration is not None
        return {"tasks": self.calibration.tasks, "tasks_path": self.calibration.tasks_path}


def entry_label(entry: dict, kind: str) -> str:
    if entry.get("label"):
        return str(entry["label"])
    if kind == "humans":
        human = str(entry.get("human", "reference"))
        model = entry.get("human_model") or entry.get("human_url")
        return f"{human}-{Path(str(model)).name}" if human in ("llm", "plausible") and model else human
    return str(entry.get("tasks", "humaneval"))


def _without_label(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k not in ("label", "humans")}


def eval_fields(*parts: dict, where: str):
    from empower.env import EvalConfig

    merged = {}
    for part in parts:
        merged.update(_without_label(part))
    return config_from_dict(EvalConfig, merged, where=where)


def data_config(config: ReproduceConfig, method: GridMethod, eta: float, out: Path | None = None):
    """The DataConfig of a trained method: the shared ``data`` section plus the method's labeling rule."""
    from empower.labeling import DataConfig

    folder = out or config.out / "data" / (
        f"empower-eta{eta:g}" if method is GridMethod.EMPOWER else method.value
    )
    # One score cache for the whole grid: the estimator reads each document once, whatever the method.
    values = {
        "scoring_cache": config.out / "data" / "scores",
        **config.data,
        **_DATA[method],
        "out": folder,
        "resume": True,
    }
    if method is GridMethod.EMPOWER:
        values["eta"] = eta
    return config_from_dict(DataConfig, values, where="data")


def train_config(config: ReproduceConfig, method: GridMethod, data_dir: Path, out: Path | None = None):
    """The TrainConfig of a trained method (resumable; same steps and seed for every method)."""
    from empower.train import TrainConfig

    folder = out or config.out / "models" / Path(data_dir).name
    values = {**config.train, "data": data_dir, "out": folder, "resume": True}
    return config_from_dict(TrainConfig, values, where="train")


def base_model(config: ReproduceConfig) -> str:
    from empower import models

    return str(config.train.get("base", models.DEFAULT_MODEL))


def estimator(config: ReproduceConfig) -> str:
    from empower import models

    return str(config.data.get("estimator", models.DEFAULT_MODEL))


def eval_config(
    config: ReproduceConfig,
    method: GridMethod,
    human: dict,
    task_set: dict,
    eta: float,
    model_dir: Path | None = None,
    out: Path | None = None,
):
    """The EvalConfig of one cell of the grid: shared ``eval`` < task set < human < the method's policy."""
    if method in _DATA:
        folder = model_dir or config.out / "models" / data_config(config, method, eta).out.name
        policy = {"assistant": str(folder), "policy": "model"}
    else:
        policy = {"assistant": base_model(config), **_POLICY[method]}
        if method is GridMethod.THRESHOLD:
            policy.update(eta=eta, estimator=estimator(config))
    run = out or (
        config.out / "eval" / entry_label(task_set, "task_sets") / entry_label(human, "humans") / method.value
    )
    return eval_fields(
        config.eval,
        task_set,
        human,
        {**policy, "out": run, "resume": True},
        where=f"eval ({method.value}, {entry_label(human, 'humans')})",
    )


def calibration_human(config: ReproduceConfig) -> dict:
    assert config.calibration is not None
    wanted = config.calibration.human
    for human in config.grid.humans:
        if not wanted or entry_label(human, "humans") == wanted:
            return human
    labels = [entry_label(h, "humans") for h in config.grid.humans]
    raise ValueError(f"calibration.human={wanted!r} is not a grid human; labels: {', '.join(labels)}")


# --------------------------------------------------------------------------------------------------
# Stages: each one is skipped when its output is complete


def data_done(folder: Path) -> bool:
    manifest = Path(folder) / "manifest.json"
    return manifest.is_file() and json.loads(manifest.read_text()).get("complete") is True


def model_done(folder: Path) -> bool:
    return (Path(folder) / "empower-model.json").is_file()


def eval_done(folder: Path) -> bool:
    """All episodes of the run are in its traces (and its summary was written)."""
    folder = Path(folder)
    saved, traces = folder / "config.json", folder / "traces.jsonl"
    if not (saved.is_file() and traces.is_file() and (folder / "summary.json").is_file()):
        return False
    expected = json.loads(saved.read_text()).get("n_tasks")
    lines = [line for line in traces.read_text().splitlines() if line.strip()]
    return expected is not None and len(lines) >= expected


def _cpu_time() -> float:
    """CPU seconds of this process and its finished children (on a shared machine, wall time overstates)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class RankZeroFailed(RuntimeError):
    """Rank 0 stopped with an error while this rank waited for its outputs."""


@dataclass
class Ranks:
    """This process's place under ``torchrun`` or ``accelerate launch`` (alone: rank 0 of 1).

    Every rank trains (the trainer splits the batches); data building, evaluation and the records
    (config, grid.json, calibration.json, report) are rank 0's alone, so no two processes append to one
    file or load the estimator onto one GPU. The others wait for rank 0's outputs on disk rather than
    at a collective barrier, which would time out during hours of data building or evaluation. If
    rank 0 fails it leaves ``failed`` behind, and the waiting ranks stop with its error.
    """

    rank: int = 0
    world_size: int = 1
    failed: Path | None = None
    poll_seconds: float = 2.0

    @classmethod
    def start(cls, out: Path) -> Ranks:
        """Join the launcher's process group (if any); rank 0 clears an earlier launch's failure first."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())  # as training makes it: gloo on CPUs
        ranks = cls(state.process_index, state.num_processes, Path(out) / "rank0-failed.json")
        if ranks.main:
            Path(out).mkdir(parents=True, exist_ok=True)
            ranks.failed.unlink(missing_ok=True)
        state.wait_for_everyone()  # nobody reads a stale failure marker
        if not ranks.main:
            console.print(
                f"rank {ranks.rank} of {ranks.world_size}: trains with every rank; data, evaluation and "
                "records are rank 0's (this rank waits for them)"
            )
        return ranks

    @property
    def main(self) -> bool:
        return self.rank == 0

    @contextmanager
    def guard(self):
        """On rank 0, turn an error into the marker the waiting ranks stop on."""
        try:
            yield
        except BaseException as error:
            if self.main and self.failed is not None:
                self.failed.write_text(json.dumps({"error": f"{type(error).__name__}: {error}"}) + "\n")
            raise

    def wait(self, out: Path, done: Callable[[Path], bool], what: str) -> None:
        """Block until rank 0 has finished ``what`` (``done(out)``), or raise if rank 0 failed."""
        while not _finished(done, out):
            if self.failed is not None and self.failed.is_file():
                error = json.loads(self.failed.read_text()).get("error", "unknown error")
                raise RankZeroFailed(f"rank 0 failed while this rank waited for {what} ({out}): {error}")
            time.sleep(self.poll_seconds)


def _finished(done: Callable[[Path], bool], out: Path) -> bool:
    """``done(out)``, reading a file rank 0 is still writing as not done yet."""
    try:
        return done(out)
    except (OSError, ValueError):
        return False


class Stages:
    """Runs stages in order with progress lines and timings; finished outputs are skipped.

    Under several processes (:class:`Ranks`), a stage with ``every_rank`` (training) runs on all of
    them; any other stage runs on rank 0 while the rest wait for its output.
    """

    def __init__(self, total: int, ranks: Ranks | None = None):
        self.total, self.index, self.seconds, self.cpu_seconds = total, 0, {}, {}
        self.ranks = ranks or Ranks()

    def run(
        self,
        kind: str,
        name: str,
        out: Path,
        done: Callable[[Path], bool],
        work: Callable[[], object],
        *,
        every_rank: bool = False,
    ):
        self.index += 1
        if not self.ranks.main:
            if every_rank:
                if not done(out):
                    work()
            else:
                self.ranks.wait(out, done, f"{kind} {name}")
            return
        head = f"[bold][{self.index}/{self.total}][/] {kind} [cyan]{name}[/] -> {out}"
        if done(out):
            console.print(f"{head} [green]done already[/]")
            return
        console.rule(f"{kind}: {name}")
        start, cpu_start = time.perf_counter(), _cpu_time()
        try:
            work()
        except BaseException:
            console.print(
                f"{head} [bold red]failed[/]: finished stages are kept; rerun the same command to resume"
            )
            raise
        finally:
            self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - start
            self.cpu_seconds[kind] = self.cpu_seconds.get(kind, 0.0) + _cpu_time() - cpu_start
        console.print(f"{head} [green]finished[/] in {time.perf_counter() - start:.0f}s")


def run_data(data_cfg, pool) -> None:
    """One training set; the estimator comes from ``pool`` (one load serves every set)."""
    from empower.labeling import build_data

    model, tokenizer = pool.load(data_cfg.estimator, device=data_cfg.device, dtype=data_cfg.scoring_dtype)
    build_data(data_cfg, model=model, tokenizer=tokenizer)


def run_train(train_cfg) -> None:
    from empower.train import train

    train(train_cfg)


def run_evaluation(eval_cfg, pool) -> None:
    """One evaluation run; the simulated human's model stays in ``pool`` for the next run, the rest
    (the previous run's assistant) is let go."""
    from empower.env import run_eval
    from empower.humans import HumanKind

    pool.retain([eval_cfg.human_model] if HumanKind(eval_cfg.human).has_model else [])
    run_eval(eval_cfg, pool=pool)


# --------------------------------------------------------------------------------------------------
# The grid


def check_scale(config: ReproduceConfig, ranks: Ranks) -> None:
    """Refuse, before any work, settings this many processes cannot run (named by setting)."""
    trained = [m for m in config.grid.methods if m in _DATA]
    if trained or (config.calibration and config.calibration.policy is CalibrationPolicy.EMPOWER):
        try:
            train_config(config, GridMethod.EMPOWER, config.out / "data").device_batch(ranks.world_size)
        except ValueError as err:
            raise ValueError(f"train: {err}") from err


def check_saved(config: ReproduceConfig) -> None:
    """Resuming with different shared settings would mix incomparable runs: refuse, naming the keys."""
    saved_path = config.out / "config.json"
    if not saved_path.is_file():
        return
    saved, current = json.loads(saved_path.read_text()), to_dict(config)
    keys = ("data", "train", "eval")
    changed = [k for k in keys if saved.get(k) != current.get(k)]
    if saved.get("grid", {}).get("eta") != current["grid"]["eta"]:
        changed.append("grid.eta")
    if changed:
        raise ValueError(
            f"{config.out} holds a run with different {', '.join(changed)} settings; "
            "use the saved config or another out folder"
        )
