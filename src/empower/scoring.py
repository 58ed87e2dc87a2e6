"""Per-token negative log-likelihood (bits) of whole documents under an estimator LM.

For a causal LM, ``-log2 p(d_j | d_<j)`` does not depend on where a prefix was cut, so ONE forward pass
over a document gives the NLL every prefix needs; Empower's ``k*`` then follows from a cumulative sum
(:mod:`empower.labeling`). This module runs those passes:

- documents are buffered, sorted by length and packed into batches of at most ``batch_tokens`` padded
  tokens, so memory is bounded by the batch and the buffer, never by the corpus;
- a document longer than ``max_tokens`` is scored in windows that overlap by ``overlap >= 1`` tokens;
  each window contributes only the tokens that had at least ``overlap`` tokens of context (the first
  window contributes all of its tokens), the usual sliding-window perplexity scheme. The invariant,
  checked on every document: every token after the first is scored exactly once, with at least
  ``overlap`` tokens of context (or all the tokens before it). A window's first token has no context
  inside it, so with no overlap it would go unscored and be summed as 0 bits;
- the softmax runs in fp32 whatever the model dtype, because threshold decisions compare sums of
  these numbers with ``eta``.

Example::

    model, tokenizer = load_model("smollm2-135m")
    ids = tokenizer("def f(x):\\n    return x\\n", add_special_tokens=False).input_ids
    [(key, nll)] = score_documents(model, [("doc", ids)], progress=False)
    # nll[j] = -log2 p(ids[j] | ids[:j]); nll[0] is NaN unless the tokenizer adds a BOS token
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

LN2 = math.log(2.0)


@dataclass
class _Row:
    """One model input row: ``tokens`` = context[start:start+len]; NLLs kept for positions >= keep_from."""

    doc: int
    start: int
    tokens: list[int]
    keep_from: int


class ScoreCache:
    """Per-document NLLs on disk, so several builds over one corpus (the grid's Empower and SFT data,
    an eta sweep, a resumed build) run the estimator once per document.

    An entry is keyed by the estimator, the scoring settings and the exact context tokens, so a
    different model, dtype, window or document never hits a stale entry.
    """

    def __init__(self, folder: str | Path, namespace: str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.namespace = namespace

    def _path(self, context: list[int]) -> Path:
        digest = hashlib.sha256(self.namespace.encode())
        digest.update(np.asarray(context, dtype=np.int64).tobytes())
        return self.folder / f"{digest.hexdigest()}.npy"

    def load(self, context: list[int]) -> np.ndarray | None:
        path = self._path(context)
        return np.load(path) if path.exists() else None

    def save(self, context: list[int], nll: np.ndarray) -> None:
        path = self._path(context)
        partial = path.with_name(path.name + ".partial.npy")  # never a torn entry
        np.save(partial, nll)
        partial.replace(path)


def context_prefix(tokenizer) -> list[int]:
    """Special tokens the tokenizer puts before text (e.g. BOS); scoring gives the model the same context."""
    with_special = tokenizer("a", add_special_tokens=True).input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    return (
        list(with_special[: len(with_special) - len(plain)]) if with_special[-len(plain) :] == plain else []
    )


def _windows(doc: int, context: list[int], max_tokens: int, overlap: int) -> list[_Row]:
    if len(context) < 2:  # nothing to predict
        return []
    if len(context) <= max_tokens:
        return [_Row(doc, 0, context, 1)]
    rows, start = [], 0
    while True:
        end = min(start + max_tokens, len(context))
        rows.append(_Row(doc, start, context[start:end], 1 if start == 0 else start + overlap))
        if end == len(context):
            return rows
        start = end - overlap


def _batches(rows: list[_Row], batch_tokens: int) -> Iterator[list[_Row]]:
    """Rows sorted by length, packed so that rows x longest row <= batch_tokens (at least one row)."""
    batch: list[_Row] = []
    for row in sorted(rows, key=lambda r: len(r.tokens)):
        if batch and (len(batch) + 1) * len(row.tokens) > batch_tokens:
            yield batch
            batch = []
        batch.append(row)
    if batch:
        yield batch


@torch.inference_mode()
def _score_batch(model, batch: list[_Row], pad_id: int) -> list[np.ndarray]:
    """NLL in bits of tokens 1..len-1 of each row (row-local positions), one forward pass."""
    device = next(model.parameters()).device
    width = max(len(r.tokens) for r in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, row in enumerate(batch):
        input_ids[i, : len(row.tokens)] = torch.tensor(row.tokens)
        mask[i, : len(row.tokens)] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    logits = model(input_ids=input_ids, attention_mask=mask).logits  # (B, T, V)
    # One row at a time: the fp32 log-softmax temporary stays (T, V) instead of (B, T, V).
    nats = torch.stack(
        [
            torch.nn.functional.cross_entropy(row[:-1].float(), ids[1:], reduction="none")
            for row, ids in zip(logits, input_ids, strict=True)
        ]
    )
    bits = (nats / LN2).cpu().numpy()
    return [bits[i, : len(row.tokens) - 1] for i, row in enumerate(batch)]


def score_documents(
    model,
    documents: Iterable[tuple[object, list[int]]],
    *,
    prefix: list[int] | None = None,
    batch_tokens: int = 2048,
    max_tokens: int = 2048,
    overlap: int = 256,
    buffer_documents: int = 64,
    progress: bool = True,
    cache: ScoreCache | None = None,
) -> Iterator[tuple[object, np.ndarray]]:
    """Stream ``(key, nll_bits)`` for ``(key, token_ids)`` documents, in input order.

    Args:
        model: a causal LM (eval mode); its dtype is used as is, the softmax is fp32.
        documents: ``(key, ids)`` pairs, ids WITHOUT special tokens; consumed lazily.
        prefix: context placed before every document (see :func:`context_prefix`); not scored.
        batch_tokens: padded tokens per forward pass (memory bound).
        max_tokens: longest row the model sees; longer documents are split into windows.
        overlap: tokens of context each later window re-reads from the previous one.
        buffer_documents: documents sorted together by length (more = less padding).
        progress: show a progress bar (tokens scored).
        cache: documents found there are not scored again; newly scored ones are stored.

    Returns:
        An iterator of ``(key, nll)`` with ``nll`` float32 of length ``len(ids)``:
        ``nll[j] = -log2 p(ids[j] | prefix + ids[:j])``; ``nll[0]`` is NaN when ``prefix`` is empty.
    """
    if not 1 <= overlap < max_tokens:
        raise ValueError(
            f"overlap must be in [1, max_tokens={max_tokens}) (a window's first token needs context), "
            f"got {overlap}"
        )
    prefix = list(prefix or [])
    pad_id = getattr(model.config, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id  # padded positions are masked and never read
    from tqdm.auto import tqdm

    bar = tqdm(desc="scoring", unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True)
    buffer: list[tuple[object, list[int]]] = []

    def flush() -> Iterator[tuple[object, np.ndarray]]:
        contexts = [prefix + list(ids) for _, ids in buffer]
        cached = [cache.load(context) if cache else None for context in contexts]
        results = [
            hit if hit is not None else np.full(len(context), np.nan, dtype=np.float32)
            for hit, context in zip(cached, contexts, strict=True)
        ]
        rows = [
            row
            for i, context in enumerate(contexts)
            if cached[i] is None
            for row in _windows(i, context, max_tokens, overlap)
        ]
        writes = [np.zeros(len(context), dtype=np.int32) for context in contexts]
        for batch in _batches(rows, batch_tokens):
            for row, bits in zip(batch, _score_batch(model, batch, pad_id), strict=True):
                # bits[t] scores context position row.start + t + 1
                keep = slice(max(row.keep_from - row.start - 1, 0), len(bits))
                positions = np.arange(keep.start, keep.stop) + row.start + 1
                results[row.doc][positions] = bits[keep]
                writes[row.doc][positions] += 1
                bar.update(keep.stop - keep.start)
        for i, context in enumerate(contexts):
            wrong = np.flatnonzero(writes[i][1:] != 1) + 1 if cached[i] is None else []
            if len(wrong):  # a gap would be summed as 0 bits, a double write hides a window bug
                raise RuntimeError(
                    f"windowed scoring (max_tokens={max_tokens}, overlap={overlap}) wrote position "
                    f"{wrong[0]} of a {len(context)}-token context {writes[i][wrong[0]]} times, not once"
                )
        if cache:
            for context, hit, nll in zip(contexts, cached, results, strict=True):
                if hit is None:
                    cache.save(context, nll)
        for (key, _), nll in zip(buffer, results, strict=True):
            yield key, nll[len(prefix) :]
        buffer.clear()

    documents = iter(documents)
    try:
        while True:
            try:
                key, ids = next(documents)
            except StopIteration:
                break
            except Exception:
                # The input failed part-way (a bad record): score what was read before the error
                # propagates, so no finished work is lost.
                yield from flush()
                raise
            buffer.append((key, ids))
            if len(buffer) >= buffer_documents:
                yield from flush()
        yield from flush()
    finally:
        bar.close()


@torch.inference_mode()
def empower_length_literal(model, ids: list[int], cut: int, eta_bits: float, prefix: list[int] = ()) -> int:
    """Empower's ``k*`` by the paper's loop, literally: grow ``k``, re-score prompt + completion each time.

    One forward pass per candidate ``k``; kept as the reference that the one-pass rule
    (:func:`empower.labeling.empower_lengths`) is tested and benchmarked against.
    """
    device = next(model.parameters()).device
    k = 0
    while cut + k < len(ids):
        context = torch.tensor([list(prefix) + list(ids[: cut + k + 1])], device=device)
        logits = model(input_ids=context).logits[0, len(prefix) + cut - 1 : -1].float()
        bits = torch.nn.functional.cross_entropy(logits, context[0, len(prefix) + cut :], reduction="none")
        if float(bits.sum()) / LN2 >= eta_bits:
            break
        k += 1
    return k
