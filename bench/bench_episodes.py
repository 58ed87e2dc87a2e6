"""Episodes per minute of the simulated environment, batched vs one episode at a time.

The embedded SmolLM2-135M plays the assistant (policy model: it continues the code from a plain
prompt, up to 16 new tokens a turn) and the reference human plays the user, on the first 8
HumanEval tasks (2 cores shared with other jobs make more take too long). The same episodes run
three times: ``sim_batch_size = 8`` (every live episode's suggestion request in one generate call),
the same without the prompt prefix cache (``assistant_prefix_cache = 0``: every turn re-encodes the
whole program), and ``sim_batch_size = 1`` (one episode after another). Reported: episodes per
minute, the speedups, and the share of wall time outside model calls (the loop, the reference human
and token counting; goal under 20%), with the sandbox timed separately (it runs the final programs,
not model calls).

    python -m bench episodes
"""

from __future__ import annotations

import os
import tempfile
import time

from empower import models
from empower.assistant import AssistantConfig, build_assistant
from empower.env import EvalConfig, RunStats, TokenCounter, exclude_broken_references, run_episodes
from empower.humans import HumanConfig, build_human
from empower.sandbox import SandboxConfig, run_many
from empower.tasks import load_tasks

TASKS = 8
BATCH = 8


def _play(config: EvalConfig, tasks, model, tokenizer) -> tuple[RunStats, list[dict]]:
    assistant = build_assistant(config.part(AssistantConfig), model=model, tokenizer=tokenizer)
    human = build_human(config.part(HumanConfig))
    traces: list[dict] = []

    def finished(trace: dict) -> None:
        traces.append(trace)
        print(f"  {trace['task_id']}: {trace['turns']} turns, passed={trace['passed']}", flush=True)

    stats = run_episodes(tasks, assistant, human, config, TokenCounter(config.sim_count_tokenizer), finished)
    return stats, traces


def _row(label: str, stats: RunStats, traces: list[dict]) -> dict:
    loop = stats.total_s - stats.sandbox_s
    row = {
        "mode": label,
        "episodes": stats.episodes,
        "turns": sum(t["turns"] for t in traces),
        "steps": stats.steps,
        "wall s": stats.total_s,
        "episodes/min": 60 * stats.episodes / stats.total_s,
        "model s": stats.assistant_s,
        "outside model (no sandbox)": (loop - stats.assistant_s) / loop,
        "sandbox s": stats.sandbox_s,
        "Pass@1": sum(t["passed"] for t in traces) / len(traces),
        # Other jobs on the machine slow model calls; the 1-minute load average says how much.
        "load avg": os.getloadavg()[0],
    }
    print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def main() -> str:
    model, tokenizer = models.load_model(models.DEFAULT_MODEL, device="cpu")
    with tempfile.TemporaryDirectory() as out:
        base = dict(assistant=models.DEFAULT_MODEL, policy="model", max_new_tokens=16, human="reference",
                    tasks="humaneval", out=out)
        config = EvalConfig(**base)
        tasks, excluded = exclude_broken_references(load_tasks("humaneval", limit=TASKS), config)
        rows = []
        modes = (("batched", BATCH, 64), ("batched, no prefix cache", BATCH, 0), ("one by one", 1, 64))
        for label, size, cache in modes:
            config = EvalConfig(**base, sim_batch_size=size, assistant_batch_size=size, assistant_prefix_cache=cache)
            print(f"{label}: sim_batch_size={size}, assistant_prefix_cache={cache}", flush=True)
            rows.append(_row(label, *_play(config, tasks, model, tokenizer)))
    programs = [(t, t.reference) for t in tasks] * 4
    sandbox = {}
    for workers in (1, 0):
        start = time.perf_counter()
        run_many(programs, SandboxConfig(sandbox_workers=workers))
        sandbox[workers] = len(programs) / (time.perf_counter() - start)
        print(f"sandbox workers={workers or 'cores'}: {sandbox[workers]:.1f} test runs/s", flush=True)

    batched, uncached, serial = rows
    columns = list(batched)
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        table.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    speedup = batched["episodes/min"] / serial["episodes/min"]
    cached = batched["episodes/min"] / uncached["episodes/min"]
    model_share = uncached["model s"] / batched["model s"]
    share = batched["outside model (no sandbox)"]
    return "\n".join([
        "## Episodes (simulated environment)",
        "",
        f"SmolLM2-135M (policy model, up to 16 new tokens a turn) with the reference human on the first {TASKS} HumanEval tasks "
        f"({len(excluded)} excluded), fp32 CPU. Batched = {BATCH} live episodes per model call.",
        "",
        *table,
        "",
        f"- Batched vs one by one: **{speedup:.2f}x** episodes per minute.",
        f"- Prompt prefix cache (each turn encodes only what is new): **{cached:.2f}x** episodes per minute "
        f"({model_share:.2f}x less time in model calls) than batched without it.",
        f"- Share of wall time outside model calls (batched, sandbox excluded): **{100 * share:.1f}%** "
        f"(goal < 20%: {'met' if share < 0.2 else 'not met'}).",
        f"- Sandbox (final programs, timed separately): {sandbox[1]:.1f} test runs/s with 1 worker, "
        f"{sandbox[0]:.1f} with one worker per core ({sandbox[0] / sandbox[1]:.2f}x).",
    ])
