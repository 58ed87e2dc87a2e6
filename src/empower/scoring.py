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
    [(key, nll)] = score_documents(LocalEngine(model, tokenizer), [("doc", ids)], progress=False)
    # nll[j] = -log2 p(ids[j] | ids[:j]); nll[0] is NaN unless the tokenizer adds a BOS token
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from empower import models
from empower.engines.base import LN2, ScoreRequest


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

    An entry is keyed by ``namespace`` (the estimator's :func:`weights_fingerprint` and the scoring
    settings) and the exact context tokens, so different weights (a model retrained at the same
    path included), dtype, window or document never hit a stale entry.
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


# Files of a model folder that decide its outputs: weights and configs (tokenizers change the tokens,
# which are part of every cache key anyway; checkpoints and logs of a training run change nothing).
_MODEL_FILES = re.compile(r"(config\.json|adapter_config\.json|.*\.safetensors|.*\.bin|.*\.gguf)")
_HUB_BLOB = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def weights_fingerprint(spec: str | os.PathLike, memo: str | Path) -> str:
    """A sha256 that changes when the weights behind a model spec change, and is cheap to recompute.

    It covers every file that loading reads: a folder's ``config.json``, ``adapter_config.json`` and
    weight files, a ``.gguf`` file, and for a LoRA adapter also its base model (recursively); an
    embedded name is the converted folder it resolves to; a hub id is its cached snapshot, whose
    file names under ``blobs/`` already are content hashes (git sha1, LFS sha256), so it reads nothing.

    Content, not path or name: retraining at the same path changes the key, a copied or moved model
    keeps it. Hashing an 8B model's 16 GB on every run would cost minutes, so each file's sha256 is
    read once and remembered in the JSON file ``memo`` under its size, mtime, ctime and inode;
    ``ctime`` cannot be set from user space, so a file rewritten in place is always hashed again.
    """
    memo = Path(memo)
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):  # first use, or a torn memo: hashing again is always safe
        known = {}
    digest = hashlib.sha256()
    for name, content in _model_file_hashes(str(spec), known, []):
        digest.update(f"{name}={content}\n".encode())
    memo.parent.mkdir(parents=True, exist_ok=True)
    partial = memo.with_name(f"{memo.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(known, indent=1, sort_keys=True))
    partial.replace(memo)
    return digest.hexdigest()


def _model_file_hashes(spec: str, known: dict, seen: list[Path]) -> Iterator[tuple[str, str]]:
    """``(name, content hash)`` of every file loading ``spec`` reads, base models of adapters included."""
    resolved = models.resolve(spec)
    path = Path(resolved)
    if not path.exists():  # a hub id (models.resolve returns it unchanged): its cached snapshot
        from huggingface_hub import try_to_load_from_cache

        found = [try_to_load_from_cache(resolved, name) for name in ("config.json", "adapter_config.json")]
        cached = [Path(f).parent for f in found if isinstance(f, str)]
        if not cached:
            raise ValueError(f"model {spec!r}: not in the local Hugging Face cache, nothing to fingerprint")
        path = cached[0]
    if path.resolve() in seen:
        raise ValueError(f"model {spec!r}: adapter {path} names itself as its base, directly or not")
    seen.append(path.resolve())
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if _MODEL_FILES.fullmatch(f.name))
    for file in files:  # the depth tells an adapter's files from its base's
        yield f"{len(seen)}:{file.name}", _file_hash(file, known)
    if models.is_adapter(path):
        yield from _model_file_hashes(models.adapter_base(path), known, seen)


def _file_hash(file: Path, known: dict) -> str:
    """A content hash of ``file``: the name of a hub blob, else sha256, memoised in ``known`` by stat."""
    real = file.resolve()
    if real.parent.name == "blobs" and _HUB_BLOB.fullmatch(real.name):
        return real.name
    stat = real.stat()
    signature = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
    entry = known.get(str(real))
    if entry is None or entry["stat"] != signature:
        digest = hashlib.sha256()
        with open(real, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
        entry = {"stat": signature, "sha256": digest.hexdigest()}
        known[str(real)] = entry
    return entry["sha256"]


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


def _score_batch(engine, batch: list[_Row]) -> list[np.ndarray]:
    """NLL in bits of tokens 1..len-1 of each row (row-local positions): the engine's *score* verb,
    one forward pass for the packed batch."""
    scored = engine.score([ScoreRequest(row.tokens[:1], row.tokens[1:]) for row in batch])
    return [-np.asarray(logprobs, dtype=np.float64) / LN2 for logprobs in scored]


def score_documents(
    engine,
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
        engine: the estimator behind the engine interface (``LocalEngine(model, tokenizer,
            batch_size=batch_tokens)``: a packed batch is one forward pass; the model's dtype is used
            as is, the softmax is fp32).
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
            for row, bits in zip(batch, _score_batch(engine, batch), strict=True):
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
    (:func:`empower.rule.empower_lengths`) is tested and benchmarked against.
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
