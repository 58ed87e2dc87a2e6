"""Fine-tuning speed and memory on the embedded SmolLM2-135M: `python -m bench train` (~4 minutes idle).

- LoRA training tokens/s through the real trainer (`empower.train.build_trainer`, padding-free
  batches), and the ratio to raw forward+backward+optimizer steps of the same PEFT model on the same
  tokens laid out as dense equal-length rows (no data pipeline, no masks): the target is >= 0.8.
- Peak resident memory (RSS) of a LoRA run vs full fine-tuning, each in its own process.

Training pairs are cut from real code (the Python standard library) on token boundaries.
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 4
STEPS = {"lora": 8, "full": 3}  # the first step of each is warm-up, not timed


def _make_data(folder: Path, n_pairs: int = 64, seed: int = 0) -> None:
    """Pairs with prompts of 16..64 tokens and completions of 0..30 tokens, as `empower data build` writes."""
    from datasets import Dataset

    from empower import models

    tokenizer = models.load_tokenizer(models.DEFAULT_MODEL)
    rng = random.Random(seed)
    rows = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        ids = tokenizer(path.read_text(errors="replace"), add_special_tokens=False)["input_ids"]
        if len(ids) < 200:
            continue
        cut, k = rng.randrange(16, 65), rng.randrange(0, 31)
        prompt, completion = tokenizer.decode(ids[:cut]), tokenizer.decode(ids[cut : cut + k])
        rows.append(
            {"prompt": prompt, "completion": completion, "doc_id": path.name, "method": "sft-rand-0-30"}
        )
        if len(rows) == n_pairs:
            break
    Dataset.from_list(rows).save_to_disk(str(folder / "dataset"))
    (folder / "manifest.json").write_text(json.dumps({"tokenizer": models.DEFAULT_MODEL, "complete": True}))


def _worker(mode: str, data: str, out: str) -> None:
    """One measurement in a fresh process (so that peak RSS belongs to this mode alone); prints JSON.

    For LoRA, a raw step on the same tokens runs right after each trainer step (interleaved), so that
    load from other processes on this shared machine hits both measurements alike.
    """
    import torch
    from transformers import TrainerCallback

    from empower.train import TrainConfig, build_trainer

    config = TrainConfig(
        data=Path(data), out=Path(out), lora=mode != "full",
        max_steps=STEPS[mode], batch_size=BATCH, val_fraction=0, logging_steps=100,
    )  # fmt: skip
    trainer, _ = build_trainer(config)
    loader = iter(trainer.get_train_dataloader())  # seeded: the batches the trainer is about to see
    batches = [next(loader)["input_ids"] for _ in range(STEPS[mode])]

    class Clock(TrainerCallback):
        def __init__(self):
            self.trainer_s = self.raw_s = 0.0
            self.tokens = 0
            self.ratios = []  # per step: raw seconds / trainer seconds on the same tokens
            self.optimizer = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = (time.perf_counter(), state.num_input_tokens_seen)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            if state.global_step == 1:  # warm-up step, not timed
                return
            self.trainer_s += now - self.begin[0]
            self.tokens += tokens - self.begin[1]
            if mode == "lora":
                raw_s = _raw_step(model, batches[state.global_step - 1], self, torch)
                self.raw_s += raw_s
                self.ratios.append(raw_s / (now - self.begin[0]))

    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    result = {"mode": mode, "tokens_per_s": clock.tokens / clock.trainer_s, "peak_rss_mb": _peak_rss_mb()}
    if mode == "lora":
        result["raw_tokens_per_s"] = clock.tokens / clock.raw_s
        result["median_step_ratio"] = statistics.median(clock.ratios)
    print(json.dumps(result), flush=True)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _raw_step(model, ids, clock, torch) -> float:
    """Seconds of forward+backward+AdamW of the trainer's model on a batch's tokens as dense equal rows."""
    if clock.optimizer is None:
        clock.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = ids.flatten()
    rows = ids[: ids.numel() // BATCH * BATCH].view(BATCH, -1)
    start = time.perf_counter()
    model(input_ids=rows, labels=rows).loss.backward()
    clock.optimizer.step()
    clock.optimizer.zero_grad()
    return (time.perf_counter() - start) * ids.numel() / rows.numel()  # per token of the full batch


def _run(mode: str, data: Path, out: Path) -> dict:
    code = f"from bench.bench_train import _worker; _worker({mode!r}, {str(data)!r}, {str(out)!r})"
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"bench worker {mode} failed:\n{result.stderr[-3000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"{mode}: {figures} ({time.perf_counter() - started:.0f} s)", flush=True)
    return figures


def main() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        _make_data(data)
        results = {mode: _run(mode, data, Path(tmp) / mode) for mode in STEPS}
    lora, full = results["lora"], results["full"]
    ratio = lora["median_step_ratio"]
    memory = lora["peak_rss_mb"] / full["peak_rss_mb"]
    print(f"LoRA trainer / raw forward+backward: {ratio:.2f} (target >= 0.8); RSS LoRA / full: {memory:.2f}")
    return f"""## Fine-tuning (`empower train`, SmolLM2-135M, fp32 CPU)

Batches of {BATCH} pairs cut from standard-library code (prompts 16-64 tokens, completions 0-30 + EOS);
tokens/s over steps 2..N (step 1 is warm-up). *Raw* = forward+backward+AdamW of the same PEFT model on
the same tokens as dense equal-length rows, without the trainer, data pipeline or masks, run right after
each trainer step (interleaved, so load from other processes affects both alike).

| run | tokens/s | peak RSS (MB) |
|---|---:|---:|
| raw forward+backward (LoRA model) | {lora["raw_tokens_per_s"]:.1f} | |
| LoRA, padding-free batches (default) | {lora["tokens_per_s"]:.1f} | {lora["peak_rss_mb"]:.0f} |
| full fine-tuning, padding-free | {full["tokens_per_s"]:.1f} | {full["peak_rss_mb"]:.0f} |

- LoRA trainer / raw throughput, median over the interleaved steps: **{ratio:.2f}** (target >= 0.8).
- Peak memory LoRA / full fine-tuning: **{memory:.2f}**.
- Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (the absolute tokens/s fall with
  it; the interleaved ratio is the figure to compare). The trainer can beat raw: TRL's fused LM head
  computes the loss on labelled tokens only, without the full-vocabulary logits of prompt tokens.
"""


if __name__ == "__main__":
    print(main())
