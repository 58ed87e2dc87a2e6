"""Fine-tuning (empower.train) on the tiny random model: labels, data handling, outputs, resume, CLI.

Run: .venv/bin/pytest tests/test_train.py
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback
from typer.testing import CliRunner

from empower import models
from empower.cli import app
from empower.train import (
    TrainConfig,
    build_trainer,
    load_pairs,
    merge_adapter,
    split_by_document,
    tokenize_pairs,
    train,
)


def write_data_folder(out: Path, tokenizer, n_docs: int = 10, cuts: int = 4, seed: int = 0) -> list[dict]:
    """A data folder in the `empower data build` format, from real code (the stdlib) cut on token boundaries.

    Every pair's prompt and completion re-tokenize to exactly the tokens of the document; one pair in
    four has k = 0 (completion = nothing, the model must learn to stop at once).
    """
    rng = random.Random(seed)
    rows = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[: n_docs * 3]:
        ids = tokenizer(path.read_text(errors="replace"), add_special_tokens=False)["input_ids"][:160]
        kept = 0
        for attempt in range(60):
            if kept == cuts or len(ids) < 20:
                break
            cut = rng.randrange(1, len(ids) - 12)
            k = 0 if attempt % 4 == 0 else rng.randrange(1, 12)
            prompt, completion = tokenizer.decode(ids[:cut]), tokenizer.decode(ids[cut : cut + k])
            if tokenizer(prompt, add_special_tokens=False)["input_ids"] != ids[:cut]:
                continue
            if tokenizer(completion, add_special_tokens=False)["input_ids"] != ids[cut : cut + k]:
                continue
            rows.append(
                {"prompt": prompt, "completion": completion, "doc_id": path.name, "cut": cut, "k": k,
                 "cum_bits": 0.0, "method": "empower", "eta": 0.32, "estimator": models.TINY_MODEL,
                 "tokenizer": models.TINY_MODEL}
            )  # fmt: skip
            kept += 1
        if len({row["doc_id"] for row in rows}) == n_docs:
            break
    out.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows).save_to_disk(str(out / "dataset"))
    (out / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    manifest = {"tokenizer": models.TINY_MODEL, "estimator": models.TINY_MODEL, "fingerprint": f"test-{seed}",
                "complete": True, "pairs": len(rows)}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest))
    return rows


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer(models.TINY_MODEL)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_data_folder(folder, tokenizer)
    return folder


@pytest.fixture(scope="module")
def rows(data_dir) -> list[dict]:
    return [json.loads(line) for line in (data_dir / "pairs.jsonl").read_text().splitlines()]


def quick(data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(data=data, out=out, base=models.TINY_MODEL, max_steps=2, batch_size=4, logging_steps=1)
    return TrainConfig(**{**values, **overrides})


def _segments(batch) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each sequence in a collated batch, padded or padding-free."""
    if "position_ids" in batch:  # padding-free: one row, sequences start where positions restart at 0
        ids, labels, positions = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
        starts = [*(positions == 0).nonzero().flatten().tolist(), len(ids)]
        return [(ids[a:b].tolist(), labels[a:b].tolist()) for a, b in zip(starts, starts[1:], strict=False)]
    mask = batch["attention_mask"].bool()
    return [
        (i[m].tolist(), lab[m].tolist())
        for i, lab, m in zip(batch["input_ids"], batch["labels"], mask, strict=True)
    ]


@pytest.mark.parametrize("padding_free", [True, False])
def test_labels_are_completion_plus_eos_only(data_dir, rows, tokenizer, tmp_path, padding_free):
    trainer, _ = build_trainer(quick(data_dir, tmp_path / "m", padding_free=padding_free))
    by_prompt = {tuple(tokenizer(row["prompt"])["input_ids"]): row for row in rows}
    checked = 0
    for batch in trainer.get_train_dataloader():
        for ids, labels in _segments(batch):
            n_prompt = next(i for i, label in enumerate(labels) if label != -100)
            row = by_prompt[tuple(ids[:n_prompt])]  # the masked part is exactly one row's whole prompt
            completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
            assert labels[n_prompt:] == completion + [tokenizer.eos_token_id]
            assert labels[:n_prompt] == [-100] * n_prompt
            checked += 1
    assert checked == len(trainer.train_dataset) > 0


def test_k0_pairs_train_only_the_stop(data_dir, rows, tokenizer):
    empty = [row for row in rows if row["k"] == 0]
    assert empty, "the fixture must contain k=0 pairs"
    tokenized = tokenize_pairs(Dataset.from_list(empty), tokenizer, max_length=1024)
    for ids, mask in zip(tokenized["input_ids"], tokenized["completion_mask"], strict=True):
        assert sum(mask) == 1 and mask[-1] == 1 and ids[-1] == tokenizer.eos_token_id


def test_prompt_and_completion_are_tokenized_separately(tokenizer):
    """Tokenizing the joined text would merge "\\n" + "\\n" into one token and move it into the prompt."""
    pair = Dataset.from_list([{"prompt": "x = 1\n", "completion": "\n"}])
    (ids,) = tokenize_pairs(pair, tokenizer, max_length=64)["input_ids"]
    expected = tokenizer("x = 1\n")["input_ids"] + tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert ids == expected + [tokenizer.eos_token_id]
    assert tokenizer("x = 1\n\n")["input_ids"] != expected  # the merge this avoids


def test_long_prompts_lose_their_start_not_the_completion(tokenizer):
    pair = Dataset.from_list([{"prompt": "a = 1\n" * 50, "completion": "b = 2"}])
    tokenized = tokenize_pairs(pair, tokenizer, max_length=16)
    (ids,), (mask,) = tokenized["input_ids"], tokenized["completion_mask"]
    completion = tokenizer("b = 2", add_special_tokens=False)["input_ids"]
    assert len(ids) == 16 and ids[-len(completion) - 1 :] == completion + [tokenizer.eos_token_id]
    assert sum(mask) == len(completion) + 1


def test_token_count_mismatch_is_warned(tokenizer, caplog):
    pair = Dataset.from_list([{"prompt": "def f():\n", "completion": " pass", "cut": 99, "k": 1}])
    with caplog.at_level(logging.WARNING, logger="empower.train"):
        tokenize_pairs(pair, tokenizer, max_length=64, source="pairs.jsonl")
    assert "1 of 1 pairs do not re-tokenize" in caplog.text


def test_split_holds_out_whole_documents_reproducibly(data_dir, tokenizer):
    tokenized = tokenize_pairs(load_pairs(data_dir).dataset, tokenizer, max_length=1024)
    tokenized = tokenized.add_column("doc_copy", tokenized["doc"])

    def docs(split):
        return set(split["doc_copy"])

    train_a, val_a = split_by_document(tokenized, 0.2, seed=0)
    train_b, val_b = split_by_document(tokenized, 0.2, seed=0)
    assert docs(train_a).isdisjoint(docs(val_a)) and len(docs(val_a)) == 2  # 20% of 10 documents
    assert docs(val_a) == docs(val_b) and len(train_a) + len(val_a) == len(tokenized)


@pytest.mark.parametrize("form", ["folder", "dataset", "jsonl"])
def test_data_accepted_as_folder_dataset_or_jsonl(data_dir, rows, form):
    path = {"folder": data_dir, "dataset": data_dir / "dataset", "jsonl": data_dir / "pairs.jsonl"}[form]
    data = load_pairs(path)
    assert data.dataset["prompt"] == [row["prompt"] for row in rows]
    assert data.method == "empower" and data.tokenizer_name == models.TINY_MODEL


def test_bad_data_gives_clear_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_pairs(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2:"):
        load_pairs(tmp_path / "bad.jsonl")
    (tmp_path / "nocol.jsonl").write_text('{"prompt": "a", "text": "b"}\n')
    with pytest.raises(ValueError, match="'completion'"):
        load_pairs(tmp_path / "nocol.jsonl")
    Dataset.from_list([{"prompt": "a", "text": "b"}]).save_to_disk(str(tmp_path / "d" / "dataset"))
    with pytest.raises(ValueError, match=r"no column\(s\) \['completion'\]"):
        load_pairs(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_pairs(tmp_path / "missing")


def test_unfinished_data_build_is_refused(data_dir, tmp_path):
    shutil.copytree(data_dir, tmp_path / "d")
    (tmp_path / "d" / "manifest.json").write_text(json.dumps({"complete": False}))
    with pytest.raises(ValueError, match="not complete"):
        load_pairs(tmp_path / "d")


def test_tokenizer_mismatch_is_warned_naming_both(data_dir, tokenizer, tmp_path, caplog):
    other = tmp_path / "other-tokenizer"
    changed = models.load_tokenizer(models.TINY_MODEL)
    changed.add_tokens(["<not-in-the-base-vocab>"])
    changed.save_pretrained(other)
    shutil.copy(Path(models.resolve(models.TINY_MODEL)) / "config.json", other)
    shutil.copytree(data_dir, tmp_path / "d")
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    (tmp_path / "d" / "manifest.json").write_text(json.dumps({**manifest, "tokenizer": str(other)}))
    with caplog.at_level(logging.WARNING, logger="empower.train"):
        build_trainer(quick(tmp_path / "d", tmp_path / "m"))
    assert (
        "tokenizer mismatch" in caplog.text and str(other) in caplog.text and models.TINY_MODEL in caplog.text
    )


def test_config_values_are_validated():
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig(data=Path("d"), out=Path("o"), val_fraction=1.0)
    with pytest.raises(ValueError, match="lora_rank"):
        TrainConfig(data=Path("d"), out=Path("o"), lora_rank=0)
    with pytest.raises(ValueError, match="eval_steps needs a validation split"):
        TrainConfig(data=Path("d"), out=Path("o"), eval_steps=5, val_fraction=0)
    with pytest.raises(ValueError, match="resume and overwrite"):
        TrainConfig(data=Path("d"), out=Path("o"), resume=True, overwrite=True)


def test_gguf_base_is_refused(data_dir, tmp_path):
    with pytest.raises(ValueError, match="GGUF"):
        build_trainer(quick(data_dir, tmp_path / "m", base=str(tmp_path / "model.gguf")))


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> Path:
    return train(quick(data_dir, tmp_path_factory.mktemp("run") / "model", max_steps=3, eval_steps=2))


def test_output_folder_records_the_run(trained):
    meta = json.loads((trained / "empower-model.json").read_text())
    assert (
        meta["base_model"] == models.TINY_MODEL and meta["method"] == "empower" and meta["finetune"] == "lora"
    )
    assert meta["data"] == "test-0" and meta["config"]["lora_rank"] == 16
    assert (trained / "adapter_config.json").exists() and (trained / "trainer_state.json").exists()
    assert not list(trained.glob("checkpoint-*"))  # optimizer state is only kept while a run is unfinished


def test_validation_loss_is_reported(trained):
    metrics = json.loads((trained / "empower-model.json").read_text())["metrics"]
    assert 0 < metrics["eval_loss"] < 20 and metrics["train_tokens"] > 0
    # eval_steps=2: a validation loss at step 2 during training, then the final one at step 3.
    assert [step for step, _ in metrics["eval_curve"]] == [2, 3]
    assert metrics["eval_curve"][-1][1] == pytest.approx(metrics["eval_loss"])


def test_trained_adapter_loads_through_models(trained, tiny):
    model, _ = models.load_model(trained, device="cpu")
    base, tokenizer = tiny
    ids = tokenizer("def f(x):\n    return", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits)  # the adapter is applied


def test_finished_or_different_run_is_not_overwritten(data_dir, trained):
    before = (trained / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="finished run"):
        train(quick(data_dir, trained, max_steps=3))
    with pytest.raises(ValueError, match="different run.*lr"):
        train(quick(data_dir, trained, max_steps=3, lr=1e-3))
    assert (trained / "adapter_model.safetensors").read_bytes() == before


def test_foreign_output_folder_is_refused(data_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no empower training run"):
        train(quick(data_dir, tmp_path, overwrite=True))
    assert (tmp_path / "notes.txt").read_text() == "mine"


class _StopAt(TrainerCallback):
    """Interrupts training after ``step`` (as a crash or Ctrl-C would) and counts the steps it saw."""

    def __init__(self, step: int | None = None):
        self.step, self.steps = step, 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_resume_continues_from_the_last_checkpoint(data_dir, tmp_path):
    config = quick(data_dir, tmp_path / "m", max_steps=4, save_steps=2)
    with pytest.raises(KeyboardInterrupt):
        train(config, callbacks=[_StopAt(3)])
    assert (tmp_path / "m" / "checkpoint-2").is_dir() and not (tmp_path / "m" / "empower-model.json").exists()
    with pytest.raises(ValueError, match="--resume"):
        train(config)
    counter = _StopAt()
    train(quick(data_dir, tmp_path / "m", max_steps=4, save_steps=2, resume=True), callbacks=[counter])
    assert counter.steps == 2  # steps 3 and 4 only
    assert json.loads((tmp_path / "m" / "trainer_state.json").read_text())["global_step"] == 4


def test_cli_trains_full_weights_and_merges(data_dir, tmp_path, trained):
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["train", "--data", str(data_dir), "--out", str(tmp_path / "full"), "--base", models.TINY_MODEL,
         "--full", "--max-steps", "1", "--val-fraction", "0"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "full" / "empower-model.json").read_text())["finetune"] == "full"
    assert (tmp_path / "full" / "config.json").exists() and not models.is_adapter(tmp_path / "full")

    result = runner.invoke(app, ["train", "merge", str(trained), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert not models.is_adapter(tmp_path / "merged")
    merged, tokenizer = models.load_model(tmp_path / "merged", device="cpu")
    adapted, _ = models.load_model(trained, device="cpu")
    ids = tokenizer("import os\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)


def test_the_batch_is_the_whole_steps_split_over_processes_and_accumulation(tmp_path):
    config = TrainConfig(data=tmp_path, out=tmp_path / "m", batch_size=32, grad_accum=2)
    assert config.device_batch(1) == 16 and config.device_batch(8) == 2
    with pytest.raises(ValueError, match="batch_size 32 does not split over 3 process.*use a multiple of 6"):
        config.device_batch(3)


def test_a_bf16_base_trains_fp32_adapters_with_the_asked_attention(data_dir, tmp_path):
    """What an 8B base needs on a GPU: frozen weights in bf16 (half the memory), adapters in fp32."""
    config = quick(data_dir, tmp_path / "m", base_dtype="bfloat16", attn_implementation="eager", max_steps=1)
    trainer, _ = build_trainer(config)
    dtypes = {name: p.dtype for name, p in trainer.model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert trainer.model.config._attn_implementation == "eager"
    assert math.isfinite(trainer.train().training_loss)


def test_precision_follows_the_device_and_refuses_bf16_where_a_gpu_lacks_it(tmp_path, monkeypatch):
    from empower.train import _precision

    lora, full = (
        TrainConfig(data=tmp_path, out=tmp_path),
        TrainConfig(data=tmp_path, out=tmp_path, lora=False),
    )
    if not torch.cuda.is_available():
        assert _precision(lora) == (torch.float32, False)  # a CPU: fp32, no mixed precision
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert _precision(lora) == (torch.bfloat16, True)  # an A100/H100: a bf16 base under LoRA
    assert _precision(full) == (torch.float32, True)  # weights the optimizer updates stay fp32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    assert _precision(lora) == (torch.float32, False)
    with pytest.raises(ValueError, match="bf16 and base_dtype ask for bfloat16, which Tesla V100 does not"):
        _precision(TrainConfig(data=tmp_path, out=tmp_path, bf16=True, base_dtype="bfloat16"))


def test_merge_saves_bf16_weights_that_match_the_fp32_merge(trained, tmp_path):
    """Merged in fp32, saved in bf16: half the bytes, and the same model up to bf16 rounding."""
    from safetensors import safe_open

    merge_adapter(trained, tmp_path / "fp32")
    merged = merge_adapter(trained, tmp_path / "bf16", dtype="bfloat16")
    with safe_open(merged / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    sizes = [(tmp_path / name / "model.safetensors").stat().st_size for name in ("fp32", "bf16")]
    assert sizes[1] < 0.55 * sizes[0]
    full, tokenizer = models.load_model(tmp_path / "fp32", device="cpu", dtype=torch.float32)
    half, _ = models.load_model(merged, device="cpu", dtype=torch.float32)
    ids = tokenizer("import os\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(half(ids).logits, full(ids).logits, atol=0.1, rtol=0.05)
    with pytest.raises(ValueError, match="merge dtype must be one of float32, bfloat16, float16"):
        merge_adapter(trained, tmp_path / "x", dtype="int8")


def test_merge_refuses_full_weights_and_nonempty_out(trained, tmp_path):
    with pytest.raises(ValueError, match="not a LoRA adapter"):
        merge_adapter(models.resolve(models.TINY_MODEL), tmp_path / "x")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        merge_adapter(trained, tmp_path / "x")


# ------------------------------------------------------------------ self-describing model folders


def test_output_folder_says_how_to_use_the_model(trained):
    """Template, method, eta and counting tokenizer are top-level keys, read back by the assistant."""
    meta = json.loads((trained / "empower-model.json").read_text())
    assert meta["prompt_template"] == "plain" and meta["method"] == "empower"
    assert meta["eta_bits"] == 0.32 and meta["count_tokenizer"] == models.TINY_MODEL
    assert meta["estimator"] == models.TINY_MODEL and meta["base_model"] == models.TINY_MODEL
    assert meta["data"]  # the data's fingerprint


def test_statement_template_on_data_without_statements_is_refused(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"template 'statement'.*no pair has one"):
        train(quick(data_dir, tmp_path / "m", template="statement"))
    assert not (tmp_path / "m").exists()  # refused before anything was written


def _leetcode_corpus(path: Path) -> Path:
    """A LeetCode-format corpus (solutions + problem statements) from real stdlib code."""
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:3]
    records = [
        {"problem": f"Problem {i}: rewrite {source.name}.\nKeep the behaviour the same.",
         "solutions": source.read_text(errors="replace")[:700]}
        for i, source in enumerate(sources)
    ]  # fmt: skip
    path.write_text(json.dumps(records))
    return path


def test_assistant_builds_the_prompt_training_used_under_the_statement_template(tmp_path, tokenizer):
    """Data built from a corpus with statements, trained with --template statement, loaded by path only:
    the assistant's input ids for each pair's state + statement are those the trainer trained on."""
    from empower.assistant import AssistantConfig, SuggestionRequest, build_assistant
    from empower.labeling import DataConfig, build_data

    data = build_data(
        DataConfig(corpus=str(_leetcode_corpus(tmp_path / "leetcode.json")), out=tmp_path / "data",
                   estimator=models.TINY_MODEL, cuts_per_doc=2, progress=False)
    )  # fmt: skip
    pairs = load_pairs(data).dataset
    assert all(s.startswith("Problem ") for s in pairs["statement"])  # the corpus' statements are kept
    config = quick(data, tmp_path / "model", template="statement", val_fraction=0, max_steps=1)
    model_dir = train(config)
    trainer, _ = build_trainer(config)
    split = trainer.train_dataset  # as the trainer holds it: the loss is on the labels that are not -100
    trained_prompts = [
        ids[: next(i for i, label in enumerate(labels) if label != -100)]
        for ids, labels in zip(split["input_ids"], split["labels"], strict=True)
    ]
    assert len(trained_prompts) == len(pairs)
    assert tokenizer.decode(trained_prompts[0]).startswith("# Problem 0: rewrite")

    assistant = build_assistant(AssistantConfig(assistant=str(model_dir), max_new_tokens=1,
                                                assistant_prefix_cache=0, assistant_device="cpu"))  # fmt: skip
    seen = []
    hook = assistant.engine.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()), with_kwargs=True
    )
    for row, expected in zip(pairs, trained_prompts, strict=True):
        seen.clear()
        assistant.suggest([SuggestionRequest(state=row["prompt"], statement=row["statement"])])
        assert seen[0] == expected  # the first forward pass encodes the whole prompt
    hook.remove()

    with pytest.raises(ValueError, match=r"trained with 'statement'.*empower-model.json"):
        AssistantConfig(assistant=str(model_dir), prompt_template="plain")
    merged = merge_adapter(model_dir, tmp_path / "merged")
    assert AssistantConfig(assistant=str(merged)).prompt_template.value == "statement"


def _p_eos(model, tokenizer, prompts: list[str]) -> list[float]:
    """P(EOS | prompt) under ``model``: the probability that the assistant suggests nothing."""
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            out.append(torch.softmax(model(ids).logits[0, -1].float(), -1)[tokenizer.eos_token_id].item())
    return out


def test_training_on_k0_pairs_raises_the_probability_of_eos_at_those_prompts(rows, tmp_path, tiny):
    """The method's point: k* = 0 pairs (a decision comes next) teach the model to stop at once."""
    empty = [row for row in rows if row["k"] == 0]
    (tmp_path / "k0.jsonl").write_text("".join(json.dumps(row) + "\n" for row in empty))
    base, tokenizer = tiny
    prompts = [row["prompt"] for row in empty]
    before = _p_eos(base, tokenizer, prompts)
    config = quick(tmp_path / "k0.jsonl", tmp_path / "m", lora=False, lr=5e-2, max_steps=10, val_fraction=0)
    out = train(config)
    model, _ = models.load_model(out, device="cpu")
    after = _p_eos(model, tokenizer, prompts)
    assert len(prompts) >= 5 and max(before) < 1e-3  # a random model almost never stops
    assert min(after) > 0.5, (before, after)
