"""The paper's experiment grid end to end: data, training, evaluation, calibration of eta, report.

``empower reproduce --config configs/demo.yaml`` (or ``reproduce(load_config(ReproduceConfig, path))``)
runs, under one folder ``out``:

    out/config.json                   the resolved ReproduceConfig
    out/data/<method>/                training pairs (empower.labeling.build_data), one set per method
    out/models/<method>/              LoRA assistants (empower.train.train), same prompts, same steps
    out/eval/<tasks>/<human>/<method>/  evaluation runs (empower.env.run_eval)
    out/calibration/                  the eta sweep (calibration.json + one run per eta), if configured
    out/grid.json                     which run is which method/human/task set, stage times
    out/report/                       report.md, report.html, figures/ (empower.report.build_report)

Methods: Empower (eta), SFT-10, SFT-20, SFT-RAND-1-30 (all trained from the same base model on the
same prompts for the same number of optimizer steps), Base, Base-10, Base-20 (the untuned model), and
Threshold (training-free Empower decoding: the base model stops when the estimator's cumulative NLL of
its suggestion reaches eta). Every stage skips finished outputs (a data folder whose manifest says
complete, a model folder with ``empower-model.json``, a run with all its episodes) and resumes
unfinished ones, so a failed or interrupted run continues where it stopped when the command is rerun.

With ``grid.eta: null`` eta is first chosen by :func:`empower.calibration.calibrate`.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from empower import models
from empower.calibration import calibrate
from empower.configs import to_dict
from empower.experiment import (
    _DATA,
    LABELS,
    CalibrationConfig,
    GridConfig,
    GridMethod,
    Ranks,
    ReproduceConfig,
    Stages,
    check_saved,
    check_scale,
    console,
    data_config,
    data_done,
    entry_label,
    eval_config,
    eval_done,
    model_done,
    run_data,
    run_evaluation,
    run_train,
    train_config,
)


def _machine() -> str:
    import torch

    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads"


def _write_grid(config: ReproduceConfig, runs: list[dict], stages: Stages, command: str | None) -> None:
    """Record which run is which, the command, and stage times summed over every invocation (resumes)."""
    path = config.out / "grid.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    totals = {}
    for key, current in (("stage_seconds", stages.seconds), ("stage_cpu_seconds", stages.cpu_seconds)):
        totals[key] = dict(previous.get(key, {}))
        for kind, value in current.items():
            totals[key][kind] = totals[key].get(kind, 0.0) + value
    record = {
        "command": command or previous.get("command"),
        "config": str(config.out / "config.json"),
        "machine": _machine(),
        "wall_time_s": sum(totals["stage_seconds"].values()),
        "cpu_time_s": sum(totals["stage_cpu_seconds"].values()),
        **totals,
        "runs": runs,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")


def reproduce(config: ReproduceConfig, *, command: str | None = None) -> Path:
    """Run the whole grid under ``config.out`` (resuming what is there); returns the report path.

    Args:
        config: the experiment (see :class:`ReproduceConfig`; ``load_config(ReproduceConfig, yaml)``).
        command: the command line that started it, recorded in the report.

    Returns:
        ``out/report/report.md`` (or ``out`` when ``config.report`` is false).

    Example::

        reproduce(load_config(ReproduceConfig, "configs/demo.yaml"))
    """
    check_saved(config)
    ranks = Ranks.start(config.out)
    check_scale(config, ranks)
    if ranks.main:
        config.out.mkdir(parents=True, exist_ok=True)
        (config.out / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
    trained = [m for m in config.grid.methods if m in _DATA]
    cells = config.grid.cells()
    calibration_stages = (
        config.calibration.stage_count if config.grid.eta is None and config.calibration else 0
    )
    stages = Stages(calibration_stages + 2 * len(trained) + len(cells), ranks)
    runs: list[dict] = []
    with ranks.guard():
        try:
            eta = config.grid.eta if config.grid.eta is not None else calibrate(config, stages)
            pool = models.ModelPool()  # the estimator across data builds, the human across runs
            for method in trained:
                data_cfg = data_config(config, method, eta)
                stages.run(
                    "data", LABELS[method], data_cfg.out, data_done, lambda c=data_cfg: run_data(c, pool)
                )
            pool.retain([])  # training loads its own copy: free the estimator first
            for method in trained:
                train_cfg = train_config(config, method, data_config(config, method, eta).out)
                stages.run(
                    "train",
                    LABELS[method],
                    train_cfg.out,
                    model_done,
                    lambda c=train_cfg: run_train(c),
                    every_rank=True,
                )
            for task_set, human, method in cells:
                eval_cfg = eval_config(config, method, human, task_set, eta)
                tasks_label, human_label = entry_label(task_set, "task_sets"), entry_label(human, "humans")
                stages.run(
                    "eval",
                    f"{LABELS[method]} / {human_label} / {tasks_label}",
                    eval_cfg.out,
                    eval_done,
                    lambda c=eval_cfg: run_evaluation(c, pool),
                )
                runs.append(
                    {
                        "run": str(eval_cfg.out.relative_to(config.out)),
                        "method": LABELS[method],
                        "human": human_label,
                        "tasks": tasks_label,
                    }
                )
        finally:
            if ranks.main:
                _write_grid(config, runs, stages, command)
        if not config.report or not ranks.main:
            return config.out
        return write_report(config.out)


def write_report(root: Path) -> Path:
    """Build ``root/report`` and print the comparison table(s) and where the figures are."""
    from rich.markdown import Markdown

    from empower.report import build_report, collect_runs, main_table

    path = build_report([root], root / "report")
    entries, _, _ = collect_runs([root])
    for tasks in dict.fromkeys(e.tasks for e in entries):
        console.rule(f"Task set: {tasks}  (95% bootstrap CIs)")
        console.print(Markdown(main_table([e for e in entries if e.tasks == tasks])))
    figures = sorted((root / "report" / "figures").glob("*.png"))
    console.print(f"report: {path}\nhtml:   {path.with_suffix('.html')}")
    for figure in figures:
        console.print(f"figure: {figure}")
    return path


__all__ = ["CalibrationConfig", "GridConfig", "GridMethod", "ReproduceConfig", "reproduce", "write_report"]
