"""Training pairs for `empower train`: read a data folder, tokenize prompt + completion + EOS, split.

Kept apart from :mod:`empower.train` (the trainer) so that both stay readable; ``empower.train``
re-exports these names. Data folders are described in docs/design.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch
from datasets import Dataset, load_from_disk

from empower.jsonl import iter_jsonl
from empower.prompts import PromptTemplate, build_prompt

log = logging.getLogger("empower.train")


@dataclasses.dataclass
class TrainData:
    """Training pairs and where they came from (recorded with the model so it traces back to its data)."""

    dataset: Dataset
    source: Path
    fingerprint: str
    tokenizer_name: str | None  # the tokenizer the pairs were cut with, if the data says
    method: str | None  # labeling method(s) of the pairs: empower, sft-10, ...
    eta_bits: float | None = None  # threshold the pairs were labeled at (None: not Empower, or mixed)
    estimator: str | None = None  # the model whose NLLs cut the pairs, if the data says


def _read_jsonl(path: Path) -> Dataset:
    rows = []
    for number, row in iter_jsonl(path):
        for field in ("prompt", "completion"):
            if not isinstance(row.get(field), str):
                raise ValueError(f"{path}:{number}: field {field!r} missing or not text")
        rows.append(row)
    return Dataset.from_list(rows)


def load_pairs(path: str | Path) -> TrainData:
    """Read pairs from a data folder (``DIR``), its ``DIR/dataset`` folder, or a ``.jsonl`` file.

    Raises FileNotFoundError for a missing path and ValueError for an unfinished build, an empty
    dataset, or missing ``prompt``/``completion`` columns, naming the path.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"training data {path} does not exist (expected an `empower data build` folder)"
        )
    manifest_path = None
    if path.is_file():
        dataset, manifest_path = _read_jsonl(path), path.parent / "manifest.json"
        fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    else:
        if (path / "dataset").is_dir():
            path, manifest_path = path / "dataset", path / "manifest.json"
        elif (path / "pairs.jsonl").is_file():
            return load_pairs(path / "pairs.jsonl")
        else:
            manifest_path = path.parent / "manifest.json"
        try:
            dataset = load_from_disk(str(path))
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"{path} holds no dataset (no dataset/, pairs.jsonl or saved Dataset)"
            ) from err
        fingerprint = dataset._fingerprint
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if manifest.get("complete") is False:
        raise ValueError(
            f"{manifest_path} says the data build is not complete; finish it (`empower data build --resume`)"
        )
    missing = [c for c in ("prompt", "completion") if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{path}: no column(s) {missing}; found {dataset.column_names} (expected prompt, completion)"
        )
    if len(dataset) == 0:
        raise ValueError(f"{path}: the dataset is empty (0 pairs); nothing to train on")
    methods = sorted(set(dataset["method"])) if "method" in dataset.column_names else []
    tokenizer_name = manifest.get("tokenizer") or (
        dataset[0]["tokenizer"] if "tokenizer" in dataset.column_names else None
    )
    return TrainData(
        dataset=dataset,
        source=path,
        fingerprint=str(manifest.get("fingerprint") or fingerprint),
        tokenizer_name=tokenizer_name,
        method=manifest.get("method") or ("+".join(methods) if methods else None),
        eta_bits=manifest["eta_bits"] if "eta_bits" in manifest else _only(dataset, "eta"),
        estimator=manifest.get("estimator") or _only(dataset, "estimator"),
    )


def _only(dataset: Dataset, column: str):
    """The one value every row has in ``column``; None when the column is absent or values differ."""
    values = set(dataset[column]) if column in dataset.column_names else set()
    return values.pop() if len(values) == 1 else None


def check_statements(dataset: Dataset, template, source: Path | str) -> None:
    """Refuse the statement template on pairs without statements: training would see plain code while
    the assistant, given each task's statement, would prepend it (two different inputs for one state)."""
    if PromptTemplate(template) is not PromptTemplate.STATEMENT:
        return
    statements = dataset["statement"] if "statement" in dataset.column_names else []
    have = sum(bool(s and s.strip()) for s in statements)
    if have == 0:
        raise ValueError(
            f"{source}: template 'statement' needs pairs with a problem statement, but no pair has one "
            "(only corpora with statements give them: LeetCode, MBPP); train with --template plain"
        )
    if have < len(dataset):
        log.warning(
            "%s: %d of %d pairs have no statement; their prompts are the plain code", source,
            len(dataset) - have, len(dataset),
        )  # fmt: skip


def tokenize_pairs(
    dataset: Dataset,
    tokenizer,
    *,
    max_length: int,
    template=PromptTemplate.PLAIN,
    source: Path | str = "data",
) -> Dataset:
    """``input_ids`` = tokens(prompt) + tokens(completion) + EOS and ``completion_mask`` (1 on completion + EOS).

    The prompt is ``build_prompt(prompt, statement, template)``, tokenized alone, as the assistant
    builds and tokenizes it at inference (see :func:`check_statements`); tokenizing the
    concatenated text instead can merge tokens across the boundary (``"x\n" + "\n"`` -> ``"\n\n"``),
    which is how TRL's own prompt/completion path moves text between prompt and completion. Rows
    whose token counts differ from the data's ``cut``/``k`` columns are counted in a warning.
    Over-long rows lose the start of their prompt; rows whose completion alone is too long are dropped.
    """
    check_statements(dataset, template, source)
    eos = tokenizer.eos_token_id
    columns = dataset.column_names
    statement = "statement" in columns

    def encode(batch, indices):
        prompts = [
            build_prompt(p, batch["statement"][i] if statement else None, template)
            for i, p in enumerate(batch["prompt"])
        ]
        prompt_ids = tokenizer(prompts)["input_ids"]
        completion_ids = tokenizer(batch["completion"], add_special_tokens=False)["input_ids"]
        out = {"input_ids": [], "completion_mask": [], "keep": [], "roundtrip": [], "doc": []}
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
            room = max_length - len(c) - 1
            out["keep"].append(len(p) > 0 and room > 0)
            p = p[-room:] if room > 0 else p
            out["input_ids"].append(p + c + [eos])
            out["completion_mask"].append([0] * len(p) + [1] * (len(c) + 1))
            same = True
            if "cut" in columns and "k" in columns:
                same = (
                    len(tokenizer(batch["prompt"][i], add_special_tokens=False)["input_ids"])
                    == batch["cut"][i]
                )
                same = same and len(c) == batch["k"][i]
            out["roundtrip"].append(same)
            out["doc"].append(str(batch["doc_id"][i]) if "doc_id" in columns else f"row-{indices[i]}")
        return out

    tokenized = dataset.map(
        encode,
        batched=True,
        with_indices=True,
        remove_columns=columns,
        keep_in_memory=True,
        desc="tokenizing",
    )
    mismatched = len(tokenized) - sum(tokenized["roundtrip"])
    if mismatched:
        log.warning(
            "%s: %d of %d pairs do not re-tokenize to their stored cut/k token counts with this tokenizer "
            "(trained as tokenized here, which is what the assistant sees at inference)",
            source, mismatched, len(tokenized),
        )  # fmt: skip
    dropped = len(tokenized) - sum(tokenized["keep"])
    if dropped:
        log.warning(
            "%s: dropped %d pairs with an empty prompt or a completion longer than max_length",
            source,
            dropped,
        )
        tokenized = tokenized.filter(lambda keep: keep, input_columns="keep", keep_in_memory=True)
    if len(tokenized) == 0:
        raise ValueError(f"{source}: no trainable pairs left after tokenization (max_length={max_length})")
    return tokenized.remove_columns(["keep", "roundtrip"])


def split_by_document(tokenized: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Hold out ``fraction`` of the *documents* (seeded): prefixes of one program never straddle the split."""
    if fraction == 0:
        return tokenized.remove_columns("doc"), None
    documents = sorted(set(tokenized["doc"]))
    if len(documents) < 2:
        raise ValueError(
            f"a validation split needs at least 2 documents, got {len(documents)}; use --val-fraction 0"
        )
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(len(documents) - 1, max(1, round(fraction * len(documents))))
    held_out = {documents[i] for i in order[:n_val]}
    is_val = [doc in held_out for doc in tokenized["doc"]]
    val = tokenized.select([i for i, v in enumerate(is_val) if v]).remove_columns("doc")
    train = tokenized.select([i for i, v in enumerate(is_val) if not v]).remove_columns("doc")
    return train, val
