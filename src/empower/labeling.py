"""Training pairs from a code corpus: the Empower threshold rule and the SFT-N / SFT-RAND baselines.

Run it as ``empower data build --out runs/data/empower --method empower --eta 0.32`` or from Python
with ``build_data(DataConfig(out=..., method=Method.EMPOWER))``. Per document:

1. tokenize it (no special tokens) and score it in ONE forward pass (:mod:`empower.scoring`);
2. sample ``cuts_per_doc`` prefix cut points, uniformly among the token boundaries that round-trip
   (``tokenizer(prompt) == ids[:n]``); the sample depends only on seed, document id and the corpus,
   never on the method, so every method trains on the same prompts;
3. the completion length: Empower ``k* = max{k : sum_{j<k} nll[n+j] < eta}`` from a cumulative sum
   (:func:`empower_lengths`), SFT-N ``N``, SFT-RAND uniform in ``[min, max]``; all capped at the end of
   the document and, if the end is not a round-trip boundary, shortened to the nearest one below
   (for Empower that keeps the completion under the threshold).

``k* = 0`` (the very next token already costs ``eta`` bits) is KEPT by default (``keep_zero``): such a
pair teaches the assistant to suggest nothing at a decision point, which is the behaviour Empower wants.

The output folder follows ``docs/design.md``: ``config.json``, ``pairs.jsonl`` (appended as documents
finish), ``documents.jsonl`` (one line per finished document: what ``--resume`` skips), and at the end
``dataset/`` (``datasets.Dataset.save_to_disk``, built from the JSONL) and ``manifest.json``
(``complete: false`` until everything is written).
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from empower import models
from empower.configs import check_url, option, resumable_fields, save_config, to_dict
from empower.corpus import CorpusConfig, Document, iter_documents, resolve_format
from empower.engines.local import LocalEngine
from empower.engines.openai import served_model, server_engine
from empower.jsonl import iter_jsonl
from empower.rule import document_bits, empower_lengths
from empower.scoring import ScoreCache, context_prefix, score_documents, weights_fingerprint

log = logging.getLogger(__name__)


class Method(str, enum.Enum):
    EMPOWER = "empower"
    SFT = "sft"
    SFT_RAND = "sft-rand"


@dataclass(kw_only=True)
class DataConfig(CorpusConfig):
    out: Path = option(help="output folder (config.json, pairs.jsonl, dataset/, manifest.json)")
    estimator: str = option(models.DEFAULT_MODEL, "model that scores the documents (any load_model spec)")
    estimator_url: str = option(
        "",
        "base URL of an OpenAI-compatible server with prompt_logprobs (vLLM, empower serve) running the "
        "estimator; empty: in-process. The estimator spec still names the model (its tokenizer)",
    )
    estimator_served_model: str = option(
        "", "with estimator_url: the model name on the server (empty: its only one)"
    )
    method: Method = option(Method.EMPOWER, "empower (threshold rule), sft (next N tokens), sft-rand")
    eta: float = option(0.32, "Empower threshold in BITS on the completion's total NLL (0.32: p > 0.8)")
    sft_n: int = option(10, "sft: completion length in tokens", flag="--n")
    sft_rand_min: int = option(1, "sft-rand: shortest completion (tokens)", flag="--min")
    sft_rand_max: int = option(30, "sft-rand: longest completion (tokens)", flag="--max")
    cuts_per_doc: int = option(1, "prefix cut points sampled per document (the paper: 1)")
    seed: int = option(0, "seed of the cut points (and of sft-rand lengths)")
    keep_zero: bool = option(True, "keep pairs with an empty completion (k=0: stop at a decision)")
    scoring_dtype: str = option("float32", "dtype of the estimator (fp32: threshold decisions are exact)")
    scoring_batch_tokens: int = option(2048, "padded tokens per forward pass (memory bound)", resumable=True)
    scoring_max_tokens: int = option(2048, "window length; longer documents are scored in windows")
    scoring_overlap: int = option(256, "context tokens shared by consecutive windows (at least 1)")
    scoring_cache: Path | None = option(
        None,
        "folder of per-document NLLs shared by builds over the same corpus (methods, eta values)",
        resumable=True,
    )
    device: str | None = option(None, "cuda / cpu (default: cuda when available)", resumable=True)
    resume: bool = option(
        False, "continue an interrupted build in --out, skipping finished documents", resumable=True
    )
    overwrite: bool = option(False, "delete an existing build in --out first", resumable=True)
    progress: bool = option(True, "show a progress bar", resumable=True)

    def __post_init__(self):
        super().__post_init__()
        checks = [
            (
                "eta",
                self.eta > 0,
                "the threshold is in bits and must be positive (the paper uses 0.32 and 4)",
            ),
            ("sft_n", self.sft_n >= 1, "--n must be at least 1"),
            ("sft_rand_min", 1 <= self.sft_rand_min <= self.sft_rand_max, "need 1 <= --min <= --max"),
            ("cuts_per_doc", self.cuts_per_doc >= 1, "at least one cut per document"),
            ("scoring_batch_tokens", self.scoring_batch_tokens >= 1, "must be positive"),
            (
                "estimator_served_model",
                not self.estimator_served_model or bool(self.estimator_url),
                "names a model on a server: give estimator_url too",
            ),
            (
                "scoring_overlap",
                1 <= self.scoring_overlap < self.scoring_max_tokens,
                "need 1 <= it < max tokens (a window's first token needs context to be scored)",
            ),
        ]
        check_url("estimator_url", self.estimator_url)
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: {rule}")
        if not hasattr(torch, self.scoring_dtype):
            raise ValueError(f"scoring_dtype={self.scoring_dtype!r} is not a torch dtype (float32, bfloat16)")

    @property
    def method_name(self) -> str:
        """The ``method`` column value: ``empower``, ``sft-10``, ``sft-rand-1-30``."""
        if self.method is Method.SFT:
            return f"sft-{self.sft_n}"
        if self.method is Method.SFT_RAND:
            return f"sft-rand-{self.sft_rand_min}-{self.sft_rand_max}"
        return "empower"


# ---------------------------------------------------------------- cuts and pairs


def round_trips(tokenizer, text: str, ids: list[int], end: int) -> bool:
    """Whether ``ids[:end]`` decodes to a prefix of ``text`` that tokenizes back to exactly ``ids[:end]``."""
    prefix = tokenizer.decode(ids[:end], clean_up_tokenization_spaces=False)
    return text.startswith(prefix) and tokenizer(prefix, add_special_tokens=False).input_ids == list(
        ids[:end]
    )


def _rng(seed: int, doc_id: str, stream: int) -> np.random.Generator:
    digest = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, digest, stream])


def sample_cuts(tokenizer, doc: Document, ids: list[int], count: int, seed: int) -> list[int]:
    """Up to ``count`` distinct cut points, uniform over the round-trip boundaries in ``[1, len-1]``.

    Candidates are drawn from a permutation seeded by ``(seed, doc_id)`` and checked in order, so the
    result is the same for every method. At most ``8 * count + 32`` candidates are checked.
    """
    if len(ids) < 2:
        return []
    cuts = []
    for candidate in _rng(seed, doc.doc_id, 0).permutation(len(ids) - 1)[: 8 * count + 32] + 1:
        if round_trips(tokenizer, doc.text, ids, int(candidate)):
            cuts.append(int(candidate))
            if len(cuts) == count:
                break
    return sorted(cuts)


def target_lengths(config: DataConfig, doc: Document, nll: np.ndarray, cuts: list[int]) -> np.ndarray:
    """The completion length each method asks for, capped at the end of the document."""
    cuts_array = np.asarray(cuts, dtype=np.int64)
    if config.method is Method.EMPOWER:
        wanted = empower_lengths(nll, cuts_array, config.eta)
    elif config.method is Method.SFT:
        wanted = np.full(len(cuts), config.sft_n)
    else:
        wanted = _rng(config.seed, doc.doc_id, 1).integers(
            config.sft_rand_min, config.sft_rand_max + 1, len(cuts)
        )
    return np.minimum(wanted, len(nll) - cuts_array)


def label_document(
    config: DataConfig, tokenizer, doc: Document, ids: list[int], nll: np.ndarray
) -> list[dict]:
    """The training rows of one scored document (possibly none: too short, or only empty ones dropped)."""
    cuts = sample_cuts(tokenizer, doc, ids, config.cuts_per_doc, config.seed)
    if not cuts:
        return []
    bits = document_bits(nll, doc.doc_id)
    rows = []
    for cut, wanted in zip(cuts, target_lengths(config, doc, bits, cuts), strict=True):
        k = int(wanted)
        while k > 0 and not round_trips(tokenizer, doc.text, ids, cut + k):
            k -= 1
        if k == 0 and not config.keep_zero:
            continue
        prompt = tokenizer.decode(ids[:cut], clean_up_tokenization_spaces=False)
        whole = tokenizer.decode(ids[: cut + k], clean_up_tokenization_spaces=False)
        rows.append(
            {
                "prompt": prompt,
                "completion": whole[len(prompt) :],
                "doc_id": doc.doc_id,
                "cut": cut,
                "k": k,
                "cum_bits": float(bits[cut : cut + k].sum()),
                "method": config.method_name,
                "eta": config.eta if config.method is Method.EMPOWER else None,
                "estimator": config.estimator,
                "tokenizer": config.estimator,
                "statement": doc.statement,  # for `empower train --template statement`
                "shortened": k < int(wanted),
            }
        )
    return rows


# ---------------------------------------------------------------- the data folder


COLUMNS = {  # docs/design.md, "Data folder"
    "prompt": "string", "completion": "string", "doc_id": "string", "cut": "int32", "k": "int32",
    "cum_bits": "float64", "method": "string", "eta": "float64", "estimator": "string", "tokenizer": "string",
    "statement": "string",
}  # fmt: skip


def _whole_lines(path: Path) -> Iterator[dict]:
    """Records of a file that an interrupted build may have cut mid-line (none if it is missing)."""
    if path.exists():
        yield from (record for _, record in iter_jsonl(path, cut_tail_ok=True))


def _comparable(config_dict: dict) -> dict:
    return {k: v for k, v in config_dict.items() if k not in resumable_fields(DataConfig)}


# Keys every saved DataConfig has and a model's config.json has not: what marks a folder as a build.
_BUILD_KEYS = ("estimator", "method", "eta", "scoring_max_tokens")


def _is_build(out: Path) -> bool:
    """Whether ``out`` holds a data build: its ``config.json`` is a saved DataConfig."""
    try:
        saved = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and set(_BUILD_KEYS) <= saved.keys()


def _prepare_out(config: DataConfig) -> set[str]:
    """Create, overwrite or reopen ``config.out``; returns the ids of documents already finished.

    Only a data build is ever deleted or reopened: any other non-empty folder is refused untouched.
    """
    out = Path(config.out)
    saved = out / "config.json"
    if out.exists() and any(out.iterdir()):
        if not _is_build(out):
            raise ValueError(
                f"{out} is not empty and holds no empower data build (looked for {saved} with the keys "
                f"{', '.join(_BUILD_KEYS)}); nothing was deleted: choose another --out"
            )
        if config.overwrite:
            shutil.rmtree(out)
        elif not config.resume:
            raise ValueError(f"{out} already holds a data build; pass --resume to continue it or --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    if not saved.exists():
        return set()
    old, new = _comparable(json.loads(saved.read_text())), _comparable(to_dict(config))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ValueError(
            f"--resume of {out} with different settings ({detail}); use the saved ones or --overwrite"
        )
    # Keep only whole lines of finished documents: a document cut mid-way is redone, never duplicated.
    finished = list(_whole_lines(out / "documents.jsonl"))
    done = {d["doc_id"] for d in finished}
    _rewrite_jsonl(out / "documents.jsonl", finished)
    _rewrite_jsonl(out / "pairs.jsonl", (r for r in _whole_lines(out / "pairs.jsonl") if r["doc_id"] in done))
    shutil.rmtree(out / "dataset", ignore_errors=True)
    log.info("resuming %s: %d documents already done", out, len(done))
    return done


def _rewrite_jsonl(path: Path, rows) -> None:
    partial = path.with_suffix(".partial")
    with open(partial, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    partial.replace(path)


def _write_manifest(
    out: Path, config: DataConfig, tokenizer, complete: bool, fingerprint: str | None
) -> dict:
    totals = {
        "documents": 0,
        "documents_without_pairs": 0,
        "tokens": 0,
        "pairs": 0,
        "zero": 0,
        "shortened": 0,
    }
    for doc in _whole_lines(out / "documents.jsonl"):
        totals["documents"] += 1
        totals["documents_without_pairs"] += doc["pairs"] == 0
        for key in ("tokens", "pairs", "zero", "shortened"):
            totals[key] += doc[key]
    manifest = {
        "complete": complete,
        "method": config.method_name,
        "estimator": config.estimator,
        "tokenizer": config.estimator,
        "vocab_size": len(tokenizer),
        "eta_bits": config.eta if config.method is Method.EMPOWER else None,
        **totals,
        "zero_share": totals["zero"] / totals["pairs"] if totals["pairs"] else 0.0,
        "fingerprint": fingerprint,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _finish_dataset(out: Path) -> str:
    """Build ``dataset/`` from ``pairs.jsonl`` (streamed through Arrow) and return the data fingerprint."""
    from datasets import Dataset, Features, Value

    pairs = out / "pairs.jsonl"
    features = Features({name: Value(dtype) for name, dtype in COLUMNS.items()})
    if pairs.stat().st_size:
        cache = out / ".cache"
        dataset = Dataset.from_json(str(pairs), features=features, cache_dir=str(cache))
    else:
        cache, dataset = None, Dataset.from_dict({name: [] for name in features}, features=features)
    partial = out / "dataset.partial"
    shutil.rmtree(partial, ignore_errors=True)
    dataset.save_to_disk(str(partial))
    del dataset
    partial.replace(out / "dataset")
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
    digest = hashlib.sha256()
    with open(pairs, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _score_namespace(config: DataConfig) -> str:
    """What, besides the tokens, determines a document's NLLs (the score cache's key): the estimator's
    weights (by content, so a model retrained at the same path is scored again), dtype and windows."""
    weights = weights_fingerprint(config.estimator, Path(config.scoring_cache) / "weights.json")
    where = f"server:{config.estimator_url}" if config.estimator_url else config.scoring_dtype
    return f"{weights}|{where}|{config.scoring_max_tokens}|{config.scoring_overlap}"


def build_data(config: DataConfig, *, model=None, tokenizer=None) -> Path:
    """Score the corpus, label every document, and write the data folder ``config.out``.

    Args:
        config: what to read, how to label, where to write.
        model, tokenizer: an already loaded estimator (default: ``load_model(config.estimator)``);
            it must be ``config.estimator``, whose files key the score cache.

    Returns:
        ``config.out``, whose ``manifest.json`` says ``complete: true``.

    Example::

        build_data(DataConfig(out=Path("runs/data/sft"), method=Method.SFT, sft_n=10, corpus_limit=50))
    """
    out = Path(config.out)
    # Bad input (missing corpus, unknown model) fails before anything is written.
    resolve_format(config)
    if model is None:
        models.resolve(config.estimator)
    done = _prepare_out(config)
    save_config(config, out / "config.json")
    if config.estimator_url:
        tokenizer = models.load_tokenizer(config.estimator)
        key = os.environ.get("EMPOWER_ESTIMATOR_API_KEY")
        served = served_model(config.estimator_url, config.estimator_served_model, key)
        estimator = server_engine(config.estimator_url, served, tokenizer, api_key=key)
    else:
        if model is None or tokenizer is None:
            model, tokenizer = models.load_model(
                config.estimator, device=config.device, dtype=config.scoring_dtype
            )
        # A packed batch (at most scoring_batch_tokens padded tokens) is one forward pass.
        estimator = LocalEngine(model, tokenizer, batch_size=config.scoring_batch_tokens, prefix_cache=0)
    _write_manifest(out, config, tokenizer, complete=False, fingerprint=None)

    def tokenized():
        for doc in iter_documents(config):
            if doc.doc_id not in done:
                ids = tokenizer(doc.text, add_special_tokens=False).input_ids
                yield (doc, ids), ids

    scored = score_documents(
        estimator,
        tokenized(),
        prefix=context_prefix(tokenizer),
        batch_tokens=config.scoring_batch_tokens,
        max_tokens=config.scoring_max_tokens,
        overlap=config.scoring_overlap,
        progress=config.progress,
        cache=ScoreCache(config.scoring_cache, _score_namespace(config)) if config.scoring_cache else None,
    )
    with (
        open(out / "pairs.jsonl", "a", encoding="utf-8") as pairs_fh,
        open(out / "documents.jsonl", "a", encoding="utf-8") as docs_fh,
    ):
        for (doc, ids), nll in scored:
            rows = label_document(config, tokenizer, doc, ids, nll)
            for row in rows:
                record = {key: value for key, value in row.items() if key != "shortened"}
                pairs_fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            pairs_fh.flush()  # pairs before the document line: resume trusts only documents.jsonl
            summary = {
                "doc_id": doc.doc_id,
                "tokens": len(ids),
                "pairs": len(rows),
                "zero": sum(r["k"] == 0 for r in rows),
                "shortened": sum(r["shortened"] for r in rows),
            }
            docs_fh.write(json.dumps(summary) + "\n")
            docs_fh.flush()
    (out / "pairs.jsonl").touch()
    fingerprint = _finish_dataset(out)
    manifest = _write_manifest(out, config, tokenizer, complete=True, fingerprint=fingerprint)
    log.info(
        "%s: %d pairs from %d documents (k=0: %.1f%%)",
        out,
        manifest["pairs"],
        manifest["documents"],
        100 * manifest["zero_share"],
    )
    return out


# ---------------------------------------------------------------- stats


@dataclass
class DataStats:
    """What a data folder holds, read by streaming ``pairs.jsonl`` (any size)."""

    folder: Path
    complete: bool
    pairs: int
    documents: int
    per_method: dict[str, int]
    zero_share: float
    mean_k: float
    mean_cum_bits: float
    k_counts: dict[int, int]  # completion length in tokens -> pairs

    def text_histogram(self, width: int = 40, bins: int = 12) -> str:
        """Completion lengths as a text bar chart (tokens; the first bin is k = 0 alone)."""
        if not self.pairs:
            return "(no pairs)"
        top = max(self.k_counts)
        step = max(1, -(-top // (bins - 1)))
        edges = [(0, 0)] + [(1 + i * step, (i + 1) * step) for i in range(-(-top // step))]
        counts = [sum(c for k, c in self.k_counts.items() if lo <= k <= hi) for lo, hi in edges]
        scale = width / max(counts)
        lines = [
            f"{f'{lo}' if lo == hi else f'{lo}-{hi}':>9} | {'#' * round(n * scale):<{width}} {n}"
            for (lo, hi), n in zip(edges, counts, strict=True)
        ]
        return "\n".join(["completion length (tokens)", *lines])

    def summary(self) -> str:
        methods = ", ".join(f"{m}: {n}" for m, n in sorted(self.per_method.items()))
        return (
            f"{self.folder}: {'complete' if self.complete else 'INCOMPLETE (resume with --resume)'}\n"
            f"pairs {self.pairs} from {self.documents} documents ({methods})\n"
            f"k = 0: {100 * self.zero_share:.1f}% of pairs; mean k {self.mean_k:.2f} tokens; "
            f"mean completion NLL {self.mean_cum_bits:.3f} bits"
        )


def data_stats(folder: str | Path) -> DataStats:
    """Counts per method, share of ``k = 0`` and the completion-length distribution of a data folder."""
    folder = Path(folder)
    pairs_path = folder / "pairs.jsonl"
    if not pairs_path.is_file():
        raise FileNotFoundError(f"{folder} is not an empower data folder (no pairs.jsonl)")
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    per_method: dict[str, int] = {}
    k_counts: dict[int, int] = {}
    pairs = total_k = 0
    total_bits = 0.0
    for _, row in iter_jsonl(pairs_path):
        pairs += 1
        per_method[row["method"]] = per_method.get(row["method"], 0) + 1
        k_counts[row["k"]] = k_counts.get(row["k"], 0) + 1
        total_k += row["k"]
        total_bits += row["cum_bits"]
    return DataStats(
        folder=folder,
        complete=bool(manifest.get("complete")),
        pairs=pairs,
        documents=manifest.get("documents", 0),
        per_method=per_method,
        zero_share=k_counts.get(0, 0) / pairs if pairs else 0.0,
        mean_k=total_k / pairs if pairs else 0.0,
        mean_cum_bits=total_bits / pairs if pairs else 0.0,
        k_counts=dict(sorted(k_counts.items())),
    )


def plot_lengths(stats: DataStats, path: str | Path) -> Path:
    """Save the completion-length histogram as a PNG (matplotlib, no display needed)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(list(stats.k_counts), list(stats.k_counts.values()), width=1.0, color="#4c72b0")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("completion length k (tokens)")
    ax.set_ylabel("pairs")
    methods = ", ".join(sorted(stats.per_method)) or "no pairs"
    ax.set_title(f"{methods}: {stats.pairs} pairs, k=0 {100 * stats.zero_share:.0f}%")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
