"""Per-token NLL from one batched pass: equals a plain forward pass, windows, edge cases, streaming."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from empower.scoring import ScoreCache, score_documents

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
    results = list(score_documents(model, enumerate(docs), progress=False))
    assert [key for key, _ in results] == [0, 1, 2]
    for (_, nll), ids in zip(results, docs, strict=True):
        assert len(nll) == len(ids) and np.isnan(nll[0])
        np.testing.assert_allclose(nll[1:], _plain_bits(model, ids), atol=1e-4)


def test_windows_agree_with_the_full_pass_on_a_document_that_fits(tiny, docs):
    model, _ = tiny
    ids = docs[0]
    [(_, full)] = score_documents(model, [(0, ids)], progress=False)
    [(_, windowed)] = score_documents(model, [(0, ids)], max_tokens=32, overlap=16, progress=False)
    assert len(ids) > 64  # several windows
    np.testing.assert_allclose(windowed[1:32], full[1:32], atol=1e-4)  # the first window is a full pass
    assert not np.isnan(windowed[1:]).any()
    # Later tokens see 16..31 tokens of context instead of all: close, not equal.
    assert np.abs(windowed[32:] - full[32:]).mean() < 0.05 * full[32:].mean()


def test_every_token_is_scored_exactly_once_by_the_windows(tiny, docs):
    model, _ = tiny
    ids = docs[0]
    [(_, windowed)] = score_documents(model, [(0, ids)], max_tokens=20, overlap=5, progress=False)
    # Token 20 is the first one of the second window that has 5 tokens of context: ids[15:20].
    expected = _plain_bits(model, ids[15:21])[-1]
    assert windowed[20] == pytest.approx(expected, abs=1e-4)


def test_empty_and_one_token_documents(tiny):
    model, _ = tiny
    results = dict(score_documents(model, [("empty", []), ("one", [42]), ("two", [42, 43])], progress=False))
    assert len(results["empty"]) == 0
    assert len(results["one"]) == 1 and np.isnan(results["one"][0])
    assert len(results["two"]) == 2 and results["two"][1] > 0


def test_documents_are_consumed_lazily(tiny, docs):
    """An endless stream still yields: memory is bounded by the buffer, not the corpus."""
    model, _ = tiny
    endless = ((i, docs[1]) for i in itertools.count())
    first = list(itertools.islice(score_documents(model, endless, buffer_documents=2, progress=False), 3))
    assert [key for key, _ in first] == [0, 1, 2]


def test_bad_overlap_is_refused(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="overlap"):
        list(score_documents(model, [(0, [1, 2, 3])], max_tokens=8, overlap=8, progress=False))


def test_cached_documents_are_not_scored_again(tiny, docs, tmp_path):
    model, _ = tiny
    cache = ScoreCache(tmp_path, "tiny|float32")
    first = dict(score_documents(model, enumerate(docs), progress=False, cache=cache))
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        second = dict(score_documents(model, enumerate(docs), progress=False, cache=cache))
    finally:
        hook.remove()
    assert calls == []
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


def test_cache_entries_depend_on_the_namespace(tiny, docs, tmp_path):
    model, _ = tiny
    list(score_documents(model, enumerate(docs), progress=False, cache=ScoreCache(tmp_path, "model-a")))
    other = ScoreCache(tmp_path, "model-b")
    assert all(other.load(ids) is None for ids in docs)
    assert all(ScoreCache(tmp_path, "model-a").load(ids) is not None for ids in docs if len(ids) > 1)
