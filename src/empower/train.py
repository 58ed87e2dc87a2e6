"""Fine-tune an assistant on prompt/completion pairs: TRL's SFTTrainer, PEFT LoRA, accelerate.

The loss is on the completion only, and every completion ends with the tokenizer's EOS token, so
the assistant learns *where to stop* (the point of the method; k=0 pairs teach it to stop at once).
Prompts go through :func:`empower.prompts.build_prompt`, the same function the assistant uses at
inference. The same entry point runs on one device or many::

    empower train --data runs/data/empower --base smollm2-135m --out runs/models/empower
    accelerate launch -m empower train --data ... --out ...      # or: torchrun --nproc-per-node 2 -m empower ...
    empower train merge runs/models/empower --out runs/models/empower-merged

From Python: ``train(TrainConfig(data=..., out=...))`` and ``merge_adapter(src, out)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback

from empower import models
from empower.configs import option, resumable_fields, to_dict
from empower.prompts import PromptTemplate
from empower.train_data import TrainData, check_statements, load_pairs, split_by_document, tokenize_pairs

# peft and trl still read the property transformers renamed; the warning is theirs, not the user's.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

log = logging.getLogger(__name__)

__all__ = [
    "TrainConfig",
    "TrainData",
    "build_trainer",
    "load_pairs",
    "merge_adapter",
    "split_by_document",
    "tokenize_pairs",
    "train",
]

META_FILE = "empower-model.json"  # written last: its presence marks a finished run
RUN_FILE = "train-config.json"  # written first: identifies the run an output folder holds


@dataclasses.dataclass
class TrainConfig:
    """One fine-tuning run (flags of `empower train`)."""

    data: Path = option(help="data folder from `empower data build` (or its dataset/ folder, or a .jsonl)")
    out: Path = option(help="output folder: adapter (or full weights) + tokenizer + empower-model.json")
    base: str = option(models.DEFAULT_MODEL, "base model spec (embedded name, folder or hub id)")
    lora: bool = option(
        True, "train a LoRA adapter (--lora) or all weights (--full)", flag="--lora", off_flag="--full"
    )
    lora_rank: int = option(16, "LoRA rank r")
    lora_alpha: int = option(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = option(0.05, "dropout on the LoRA input")
    lora_target_modules: list[str] = option(["all-linear"], "modules that get adapters (PEFT names)")
    epochs: float = option(1.0, "passes over the training split (the paper: 1)", resumable=True)
    max_steps: int | None = option(
        None, "stop after this many optimizer steps (quick runs); overrides --epochs", resumable=True
    )
    lr: float | None = option(None, "peak learning rate; default 2e-4 with LoRA, 2e-5 with --full")
    batch_size: int = option(
        8,
        "sequences per optimizer step over all processes (each takes batch_size / (processes x "
        "grad_accum) at a time), so max_steps means the same data on any number of devices",
    )
    grad_accum: int = option(1, "micro-batches per optimizer step on each process (less memory, same step)")
    max_length: int = option(
        1024, "tokens per sequence; longer prompts lose their start (the completion is kept)"
    )
    val_fraction: float = option(0.2, "documents held out for validation loss (the paper: 20%)")
    seed: int = option(0, "seed of the split, the data order and the adapter initialisation")
    template: PromptTemplate = option(PromptTemplate.PLAIN, "prompt template (see empower.prompts)")
    padding_free: bool = option(True, "concatenate each batch into one row without padding (else pad)")
    activation_checkpointing: bool = option(False, "recompute activations in backward (less memory, slower)")
    bf16: bool | None = option(None, "bf16 mixed precision; default: on with a bf16 GPU, off on CPU")
    base_dtype: str = option(
        "auto",
        "dtype the base weights load in: auto (bfloat16 for LoRA on a bf16 GPU: an 8B base takes 16 GB, "
        "not 32; float32 otherwise, and for --full, whose weights the optimizer updates), float32, bfloat16",
    )
    attn_implementation: str | None = option(
        None, "attention kernel (sdpa, flash_attention_2, eager, ...); default: transformers' choice"
    )
    logging_steps: int = option(10, "log loss and tokens/s every N steps", resumable=True)
    eval_steps: int | None = option(
        None,
        "also compute the validation loss every N steps (to see over-fitting); default: only at the end",
        resumable=True,
    )
    save_steps: int = option(200, "checkpoint every N steps (for --resume)", resumable=True)
    resume: bool = option(False, "continue the run in --out from its last checkpoint", resumable=True)
    overwrite: bool = option(False, "replace the run already in --out", resumable=True)

    def __post_init__(self):
        self.data, self.out = Path(self.data), Path(self.out)
        self.template = PromptTemplate(self.template)
        positive = {
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "logging_steps": self.logging_steps,
            "save_steps": self.save_steps,
        }
        if self.max_steps is not None:
            positive["max_steps"] = self.max_steps
        if self.eval_steps is not None:
            positive["eval_steps"] = self.eval_steps
            if self.val_fraction == 0:
                raise ValueError("eval_steps needs a validation split; val_fraction is 0")
        if self.lr is not None:
            positive["lr"] = self.lr
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 (a prompt token and EOS), got {self.max_length}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            raise ValueError("lora_target_modules is empty; give module names or 'all-linear'")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run, or replace it")
        if self.base_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"base_dtype must be auto, float32 or bfloat16, got {self.base_dtype!r}")

    def device_batch(self, world_size: int) -> int:
        """Sequences one process takes per micro-batch; refuses a step that does not split evenly."""
        parts = world_size * self.grad_accum
        if self.batch_size % parts:
            raise ValueError(
                f"batch_size {self.batch_size} does not split over {world_size} process(es) x grad_accum "
                f"{self.grad_accum}: use a multiple of {parts}"
            )
        return self.batch_size // parts

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.lora else 2e-5)


def _run_identity(config: TrainConfig, data: TrainData) -> dict:
    """What makes two runs the same run: the config (minus resumable fields) and the data fingerprint."""
    values = {k: v for k, v in to_dict(config).items() if k not in resumable_fields(TrainConfig)}
    values["out"] = str(config.out.resolve())
    values["data"] = str(config.data.resolve())
    return {"config": values, "data_fingerprint": data.fingerprint}


def _prepare_output(config: TrainConfig, identity: dict, is_main: bool) -> bool:
    """Check ``out`` against the run it may hold; returns whether to resume from a checkpoint.

    Refuses, without touching anything, a folder with foreign content or another run (unless
    ``overwrite``), and a finished run (unless ``overwrite``).
    """
    out = config.out
    if not out.exists() or not any(out.iterdir()):
        if config.resume:
            log.warning("--resume: %s holds no run yet; starting from step 0", out)
        return False
    run_file = out / RUN_FILE
    if not run_file.exists():
        raise ValueError(
            f"output folder {out} is not empty and holds no empower training run ({RUN_FILE} missing); "
            "choose another --out"
        )
    if config.overwrite:
        if is_main:
            shutil.rmtree(out)
        return False
    stored = json.loads(run_file.read_text())
    if stored != identity:
        changed = sorted(
            key
            for key in {*stored.get("config", {}), *identity["config"]}
            if stored.get("config", {}).get(key) != identity["config"].get(key)
        )
        if stored.get("data_fingerprint") != identity["data_fingerprint"]:
            changed.append("data fingerprint")
        raise ValueError(
            f"output folder {out} holds a different run (differs in: {', '.join(changed)}); "
            "pass --overwrite to replace it or choose another --out"
        )
    if (out / META_FILE).exists():
        raise ValueError(
            f"output folder {out} already holds this finished run; pass --overwrite to train it again"
        )
    if not config.resume:
        raise ValueError(
            f"output folder {out} holds an unfinished run of this config; pass --resume to continue it "
            "or --overwrite to start again"
        )
    has_checkpoint = any(p.name.startswith("checkpoint-") for p in out.iterdir())
    if not has_checkpoint:
        log.warning("--resume: %s has no checkpoint yet; starting from step 0", out)
    return has_checkpoint


class _Progress(TrainerCallback):
    """Loss and tokens/s as training goes: a live bar in a terminal, one line per log step otherwise."""

    def __init__(self):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.progress = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._start, self._start_tokens = time.perf_counter(), state.num_input_tokens_seen
        if state.is_world_process_zero and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"), console=self.console,
            )  # fmt: skip
            self.progress.start()
            self.task = self.progress.add_task(
                "train", total=state.max_steps, status="", completed=state.global_step
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not ({"loss", "eval_loss"} & set(logs)):
            return
        seconds = time.perf_counter() - self._start
        tokens_per_s = (state.num_input_tokens_seen - self._start_tokens) / max(seconds, 1e-9)
        names = {"loss": "loss", "eval_loss": "val loss"}
        parts = [f"{name} {logs[key]:.4f}" for key, name in names.items() if key in logs]
        status = " | ".join([*parts, f"{tokens_per_s:,.0f} tok/s"])
        if self.progress is not None:
            self.progress.update(self.task, status=status)
        if self.progress is None or "eval_loss" in logs:
            self.console.print(f"step {state.global_step}/{state.max_steps}: {status}", highlight=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _base_path(base: str) -> str:
    if str(base).endswith(".gguf"):
        raise ValueError(
            f"base model {base!r} is a GGUF file, which transformers refuses to train; use an embedded name "
            "(converted once to safetensors) or a folder saved with save_pretrained"
        )
    return models.resolve(base)


def _base_spec(base: str) -> str:
    """The base model as recorded in the output: names stay names, local paths become absolute."""
    path = Path(base).expanduser()
    return str(path.resolve()) if path.exists() else base


def _check_tokenizer(data: TrainData, config: TrainConfig, tokenizer) -> None:
    """Warn, naming both, when the data was cut with a tokenizer other than the base model's."""
    name = data.tokenizer_name
    if name is None or name == config.base:
        return
    try:
        same = models.load_tokenizer(name).get_vocab() == tokenizer.get_vocab()
    except (ValueError, OSError) as err:
        log.warning("cannot load the data's tokenizer %r to compare it with %r (%s)", name, config.base, err)
        return
    if not same:
        log.warning(
            "tokenizer mismatch: the data in %s was tokenized with %r but the base model %r uses a different "
            "vocabulary; prompt/completion cuts will not fall on this model's token boundaries",
            config.data, name, config.base,
        )  # fmt: skip


def _precision(config: TrainConfig) -> tuple[torch.dtype, bool]:
    """(dtype of the base weights, bf16 mixed precision) on this machine; bf16 asked of a GPU that
    lacks it is refused by setting (CPUs run bf16 in software: allowed, slow)."""
    cuda = torch.cuda.is_available()
    bf16_gpu = cuda and torch.cuda.is_bf16_supported()
    if cuda and not bf16_gpu:
        asked = [name for name, value in (("bf16", config.bf16), ("base_dtype", config.base_dtype))
                 if value is True or value == "bfloat16"]  # fmt: skip
        if asked:
            raise ValueError(
                f"{' and '.join(asked)} ask for bfloat16, which {torch.cuda.get_device_name()} does not support; "
                "use --no-bf16 / --base-dtype float32"
            )
    mixed = config.bf16 if config.bf16 is not None else bf16_gpu
    if config.base_dtype == "auto":
        return (torch.bfloat16 if bf16_gpu and config.lora else torch.float32), mixed
    return getattr(torch, config.base_dtype), mixed


def _sft_config(config: TrainConfig):
    from accelerate import PartialState
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    device_batch = config.device_batch(PartialState(cpu=not cuda).num_processes)
    bf16 = _precision(config)[1]
    return SFTConfig(
        output_dir=str(config.out),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=device_batch,
        per_device_eval_batch_size=device_batch,
        gradient_accumulation_steps=config.grad_accum,
        seed=config.seed,
        data_seed=config.seed,
        # TRL refuses a CPU-only machine unless told, and then defaults to bf16, which we only want when asked.
        use_cpu=not cuda,
        bf16=bf16,
        # TRL turns checkpointing on by default; on small models it costs ~2.5x the time for memory we have.
        activation_checkpointing=config.activation_checkpointing,
        # Labels come from our completion_mask (see train_data.tokenize_pairs), applied by TRL.
        completion_only_loss=True,
        padding_free=config.padding_free,
        max_length=None,  # sequences are truncated (prompt side) when tokenized; TRL's cut would drop EOS
        # Padding-free batches have no padding but also no attention mask, and pad == EOS here.
        include_num_input_tokens_seen="all" if config.padding_free else "non_padding",
        eval_strategy="steps" if config.eval_steps else "no",
        eval_steps=config.eval_steps,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=1,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def build_trainer(config: TrainConfig, data: TrainData | None = None, callbacks: list | None = None):
    """The configured SFTTrainer (model, LoRA, tokenized splits), before training.

    Exposed so that tests and benchmarks can inspect exactly what :func:`train` runs (its batches,
    labels and speed). ``data`` defaults to ``load_pairs(config.data)``; ``callbacks`` are extra
    ``transformers.TrainerCallback`` objects (early stopping, experiment trackers).
    """
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTTrainer

    data = data or load_pairs(config.data)
    path = _base_path(config.base)
    tokenizer = models.load_tokenizer(path)
    _check_tokenizer(data, config, tokenizer)
    tokenized = tokenize_pairs(
        data.dataset, tokenizer, max_length=config.max_length, template=config.template, source=config.data
    )
    train_split, eval_split = split_by_document(tokenized, config.val_fraction, config.seed)
    # The training arguments first: under `accelerate launch` with DeepSpeed ZeRO-3 they register its
    # config, and from_pretrained then shards the weights over the processes as it loads them.
    args = _sft_config(config)
    extra = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_precision(config)[0], **extra)
    peft_config = None
    if config.lora:
        peft_config = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=(
                "all-linear"
                if config.lora_target_modules == ["all-linear"]
                else list(config.lora_target_modules)
            ),
            task_type="CAUSAL_LM",
        )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_split,
        eval_dataset=eval_split,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    for callback in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(callback)
    for callback in [_Progress(), *(callbacks or [])]:
        trainer.add_callback(callback)
    return trainer, data


def train(config: TrainConfig, callbacks: list | None = None) -> Path:
    """Fine-tune ``config.base`` on the pairs in ``config.data``; returns the output folder.

    The folder loads with ``empower.models.load_model(out)`` and holds the adapter (or full weights),
    the tokenizer, ``trainer_state.json`` and ``empower-model.json`` (base model, prompt template, data
    method, eta, estimator and counting tokenizer, data fingerprint, config, losses). Under ``accelerate launch``/``torchrun`` every rank trains and only
    the main one writes.

    Example::

        out = train(TrainConfig(data=Path("runs/data/empower"), out=Path("runs/models/empower"), max_steps=20))
        model, tokenizer = models.load_model(out)
    """
    from accelerate import PartialState

    # The same process group the trainer will use (gloo on CPU-only machines).
    state = PartialState(cpu=not torch.cuda.is_available())
    config.device_batch(state.num_processes)  # refused before any work: a step that cannot split,
    _precision(config)  # or bf16 on a GPU without it
    data = load_pairs(config.data)
    check_statements(data.dataset, config.template, config.data)  # before anything is written to ``out``
    identity = _run_identity(config, data)
    resume = _prepare_output(config, identity, state.is_main_process)
    state.wait_for_everyone()
    if state.is_main_process:
        config.out.mkdir(parents=True, exist_ok=True)
        (config.out / RUN_FILE).write_text(json.dumps(identity, indent=2) + "\n")
    trainer, data = build_trainer(config, data, callbacks)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    seconds = time.perf_counter() - started
    metrics = {"train_loss": result.training_loss, "train_tokens": trainer.state.num_input_tokens_seen}
    curve = [[e["step"], e["eval_loss"]] for e in trainer.state.log_history if "eval_loss" in e]
    if trainer.eval_dataset is not None:
        if not curve or curve[-1][0] != trainer.state.global_step:  # eval_steps already ran the last one
            curve.append([trainer.state.global_step, trainer.evaluate()["eval_loss"]])
        metrics["eval_loss"] = curve[-1][1]
    if config.eval_steps:
        metrics["eval_curve"] = curve
    trainer.save_model(str(config.out))
    if trainer.is_world_process_zero():
        trainer.save_state()
        for checkpoint in config.out.glob("checkpoint-*"):
            shutil.rmtree(checkpoint)
        meta = {
            "base_model": _base_spec(config.base),
            "method": data.method,
            # What the folder's users must match without being told (the assistant reads these).
            "prompt_template": config.template.value,
            "eta_bits": data.eta_bits,
            "estimator": data.estimator,
            "count_tokenizer": data.tokenizer_name,
            "finetune": "lora" if config.lora else "full",
            "data": data.fingerprint,
            "data_path": str(config.data.resolve()),
            "config": to_dict(config),
            "metrics": {**metrics, "train_seconds": round(seconds, 2), "world_size": state.num_processes},
        }
        (config.out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "eval_curve")
        if "eval_loss" in metrics:
            summary += f", validation perplexity {math.exp(metrics['eval_loss']):.2f}"
        log.info("saved %s (%s)", config.out, summary)
    state.wait_for_everyone()
    return config.out


MERGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge_adapter(
    adapter_dir: str | Path, out: str | Path, *, overwrite: bool = False, dtype: str = "float32"
) -> Path:
    """Merge a LoRA adapter folder into its base weights and save a standalone model folder.

    Args:
        adapter_dir: an output folder of :func:`train` with a LoRA adapter.
        out: where to write the merged model (refused if not empty, unless ``overwrite``).
        dtype: the saved weights' dtype; the merge itself is done in fp32 either way (bfloat16 halves
            an 8B folder to 16 GB, the dtype GPUs serve it in).

    Returns:
        ``out``, which ``models.load_model(out)`` loads without PEFT.
    """
    adapter_dir, out = Path(adapter_dir), Path(out)
    if not models.is_adapter(adapter_dir):
        raise ValueError(
            f"{adapter_dir} is not a LoRA adapter folder (no adapter_config.json, or full weights)"
        )
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"output folder {out} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    if dtype not in MERGE_DTYPES:
        raise ValueError(f"merge dtype must be one of {', '.join(MERGE_DTYPES)}, got {dtype!r}")
    model, tokenizer = models.load_model(adapter_dir, device="cpu", dtype=torch.float32, merge_adapter=True)
    model = model.to(MERGE_DTYPES[dtype])
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    meta_path = adapter_dir / META_FILE
    meta = (
        json.loads(meta_path.read_text())
        if meta_path.exists()
        else {"base_model": models.adapter_base(adapter_dir)}
    )
    meta.update(finetune="lora-merged", merged_from=str(adapter_dir.resolve()))
    (partial / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        out.rmdir()
    partial.replace(out)
    return out
