"""Per-token NLL from one batched pass: equals a plain forward pass, windows, edge cases, streaming."""

from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from empower import scoring
from empower.engines.local import LocalEngine
from empower.scoring import ScoreCache, _Row, score_documents, weights_fingerprint

CODE = '''import os


def walk(root):
    """Yield every file below root."""
    for folder, _, files in os.walk(root):
        for name in sorted(files):
            yield os.path.join(folder, name)


class Counter:
    def __init__(self):
        self.count = 0

    def add(self, value=1):
        self.count += value
        return self.count
'''


def _plain_bits(model, ids):
    """Reference: one unpadded forward pass, log-softmax in fp32, converted to bits."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    nats = -torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return (nats / np.log(2)).numpy()


@pytest.fixture(scope="module")
def docs(tiny):
    _, tokenizer = tiny
    ids = tokenizer(CODE, add_special_tokens=False).input_ids
    return [ids, ids[:7], ids[3:60]]


def test_batched_scores_equal_a_plain_forward_pass(tiny, docs):
    model, _ = tiny
    results = list(score_documents(LocalEngine(*tiny), enumerate(docs), progress=False))
    assert [key for key, _ in results] == [0, 1, 2]
    for (_, nll), ids in zip(results, docs, strict=True):
        assert len(nll) == len(ids) and np.isnan(nll[0])
        np.testing.assert_allclose(nll[1:], _plain_bits(model, ids), atol=1e-4)


def test_windows_agree_with_the_full_pass_on_a_document_that_fits(tiny, docs):
    model, _ = tiny
    ids = docs[0]
    [(_, full)] = score_documents(LocalEngine(*tiny), [(0, ids)], progress=False)
    [(_, windowed)] = score_documents(
        LocalEngine(*tiny), [(0, ids)], max_tokens=32, overlap=16, progress=False
    )
    assert len(ids) > 64  # several windows
    np.testing.assert_allclose(windowed[1:32], full[1:32], atol=1e-4)  # the first window is a full pass
    assert not np.isnan(windowed[1:]).any()
    # Later tokens see 16..31 tokens of context instead of all: close, not equal.
    assert np.abs(windowed[32:] - full[32:]).mean() < 0.05 * full[32:].mean()


def _rows_seen(model):
    """Instrument the model: every (input tokens, NLL bits per position) row it is asked to score."""
    seen = []

    def hook(_module, _args, kwargs, output):
        for ids, mask, logits in zip(
            kwargs["input_ids"], kwargs["attention_mask"], output.logits, strict=True
        ):
            ids, logits = ids[mask.bool()], logits[mask.bool()].float()
            nats = -torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None])[:, 0]
            seen.append((ids.tolist(), (nats / np.log(2)).numpy()))

    return seen, model.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("max_tokens, overlap", [(2, 1), (10, 1), (16, 5), (33, 32), (99, 1), (100, 1)])
def test_every_token_is_scored_exactly_once_at_several_windows(tiny, max_tokens, overlap):
    """Each NLL comes from a row the model really scored, with at least ``overlap`` tokens of context
    (or all of them); inside the first window it equals the single full-context pass. Exactly once:
    score_documents raises on a position written 0 or 2 times (next test), and here it does not."""
    model, _ = tiny
    ids = np.random.default_rng(max_tokens).integers(100, model.config.vocab_size, 100).tolist()
    full = _plain_bits(model, ids)
    seen, hook = _rows_seen(model)
    try:
        [(_, windowed)] = score_documents(
            LocalEngine(*tiny), [(0, ids)], max_tokens=max_tokens, overlap=overlap, progress=False
        )
    finally:
        hook.remove()
    # Random tokens: a row's start in the document is where its tokens occur.
    starts = [next(s for s in range(len(ids)) if ids[s : s + len(row)] == row) for row, _ in seen]
    assert max(len(row) for row, _ in seen) <= max_tokens
    first = min(max_tokens, len(ids))
    np.testing.assert_allclose(windowed[1:first], full[: first - 1], atol=1e-4)
    for j in range(1, len(ids)):
        candidates = [
            bits[j - start - 1]
            for (row, bits), start in zip(seen, starts, strict=True)
            if start < j < start + len(row) and j - start >= min(overlap, j)
        ]
        assert any(abs(windowed[j] - c) < 1e-4 for c in candidates), (j, windowed[j], candidates)


@pytest.mark.parametrize(
    "broken, error",
    [
        # overlap 0: the second window's first token has no context and is never written
        (
            lambda doc, ctx, m, o: [_Row(doc, 0, ctx[:10], 1), _Row(doc, 10, ctx[10:], 10)],
            "10 of a {}-token context 0 times",
        ),
        # the same window twice: every position written twice
        (
            lambda doc, ctx, m, o: [_Row(doc, 0, ctx, 1), _Row(doc, 0, ctx, 1)],
            "1 of a {}-token context 2 times",
        ),
    ],
)
def test_a_window_plan_that_misses_or_repeats_a_position_is_an_error(tiny, docs, monkeypatch, broken, error):
    monkeypatch.setattr(scoring, "_windows", broken)
    with pytest.raises(RuntimeError, match="wrote position " + error.format(len(docs[0]))):
        list(score_documents(LocalEngine(*tiny), [(0, docs[0])], progress=False))


def test_empty_and_one_token_documents(tiny):
    model, _ = tiny
    results = dict(
        score_documents(LocalEngine(*tiny), [("empty", []), ("one", [42]), ("two", [42, 43])], progress=False)
    )
    assert len(results["empty"]) == 0
    assert len(results["one"]) == 1 and np.isnan(results["one"][0])
    assert len(results["two"]) == 2 and results["two"][1] > 0


def test_documents_are_consumed_lazily(tiny, docs):
    """An endless stream still yields: memory is bounded by the buffer, not the corpus."""
    model, _ = tiny
    endless = ((i, docs[1]) for i in itertools.count())
    first = list(
        itertools.islice(score_documents(LocalEngine(*tiny), endless, buffer_documents=2, progress=False), 3)
    )
    assert [key for key, _ in first] == [0, 1, 2]


@pytest.mark.parametrize("overlap", [0, 8])
def test_bad_overlap_is_refused(tiny, overlap):
    """Overlap 0 would leave every later window's first token unscored; overlap >= max_tokens never ends."""
    model, _ = tiny
    with pytest.raises(ValueError, match=r"overlap must be in \[1, max_tokens=8\)"):
        list(
            score_documents(
                LocalEngine(*tiny), [(0, [1, 2, 3])], max_tokens=8, overlap=overlap, progress=False
            )
        )


def test_cached_documents_are_not_scored_again(tiny, docs, tmp_path):
    model, _ = tiny
    cache = ScoreCache(tmp_path, "tiny|float32")
    first = dict(score_documents(LocalEngine(*tiny), enumerate(docs), progress=False, cache=cache))
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        second = dict(score_documents(LocalEngine(*tiny), enumerate(docs), progress=False, cache=cache))
    finally:
        hook.remove()
    assert calls == []
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


def test_cache_entries_depend_on_the_namespace(tiny, docs, tmp_path):
    model, _ = tiny
    list(
        score_documents(
            LocalEngine(*tiny), enumerate(docs), progress=False, cache=ScoreCache(tmp_path, "model-a")
        )
    )
    other = ScoreCache(tmp_path, "model-b")
    assert all(other.load(ids) is None for ids in docs)
    assert all(ScoreCache(tmp_path, "model-a").load(ids) is not None for ids in docs if len(ids) > 1)


# ---------------------------------------------------------------- the cache key: the estimator's weights


@pytest.fixture
def saved_tiny(tiny, tmp_path):
    """The tiny model saved in a folder of its own (a local model spec)."""
    model, tokenizer = tiny
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _retrain(model, folder):
    """Other weights saved at the same path, with the same file names and sizes."""
    retrained = copy.deepcopy(model)
    with torch.no_grad():
        retrained.model.embed_tokens.weight.mul_(1.5)
    retrained.save_pretrained(folder)


def test_fingerprint_follows_the_weights_not_the_path(tiny, saved_tiny, tmp_path):
    memo = tmp_path / "memo.json"
    before = weights_fingerprint(saved_tiny, memo)
    assert weights_fingerprint(shutil.copytree(saved_tiny, tmp_path / "copy"), memo) == before
    size = (saved_tiny / "model.safetensors").stat().st_size
    _retrain(tiny[0], saved_tiny)
    assert (saved_tiny / "model.safetensors").stat().st_size == size
    assert weights_fingerprint(saved_tiny, memo) != before


def test_adapter_fingerprint_covers_its_base(tiny, saved_tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(saved_tiny)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    memo = tmp_path / "memo.json"
    adapter = weights_fingerprint(tmp_path / "adapter", memo)
    assert adapter != weights_fingerprint(saved_tiny, memo)
    _retrain(tiny[0], saved_tiny)  # the adapter's files are unchanged, its base is not
    assert weights_fingerprint(tmp_path / "adapter", memo) != adapter


def test_a_file_is_hashed_once_until_it_changes(saved_tiny, tmp_path):
    memo = tmp_path / "memo.json"
    honest = weights_fingerprint(saved_tiny, memo)
    entries = json.loads(memo.read_text())
    assert sorted(Path(path).name for path in entries) == ["config.json", "model.safetensors"]
    for entry in entries.values():
        entry["sha256"] = "0" * 64
    memo.write_text(json.dumps(entries))
    assert weights_fingerprint(saved_tiny, memo) != honest  # the memo is trusted: no file read
    for name in ("config.json", "model.safetensors"):
        stat = (saved_tiny / name).stat()
        os.utime(saved_tiny / name, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert weights_fingerprint(saved_tiny, memo) == honest  # a changed stat: read again


def test_hub_model_fingerprint_is_its_blob_names(tmp_path, monkeypatch):
    """A hub snapshot's files link to blobs named by their content hash: nothing is read."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--owner--name"

    def download(commit: str, blob: str) -> None:  # the layout huggingface_hub writes
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        (repo / "blobs" / blob).write_text("{}")
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").symlink_to(repo / "blobs" / blob)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    memo = tmp_path / "memo.json"
    download("a" * 40, "1" * 64)
    first = weights_fingerprint("owner/name", memo)
    assert json.loads(memo.read_text()) == {}
    download("b" * 40, "2" * 64)  # a new revision of main
    assert weights_fingerprint("owner/name", memo) != first
    with pytest.raises(ValueError, match="'owner/other': not in the local Hugging Face cache"):
        weights_fingerprint("owner/other", memo)
