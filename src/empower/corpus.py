"""Code documents from any source, as one lazy stream of typed :class:`Document` records.

Sources (``CorpusConfig.corpus`` + ``corpus_format``; ``auto`` guesses from the path):

- ``stdlib``: the Python source that ships with the interpreter (offline, no download). Test folders,
  ``site-packages`` and the IDLE/lib2to3 fixtures are left out. It contains no benchmark problems, so it
  is disjoint from HumanEval, MBPP and LiveCodeBench by construction.
- a folder: every file matching ``corpus_glob`` (default ``**/*.py``), in sorted order;
- a JSONL file: the text in field ``corpus_field`` of each line;
- ``leetcode``: the LeetCode JSON list whose records have ``solutions`` (the reference programs);
- ``mbpp``: the MBPP JSONL (``task_id``, ``code``); only ids in ``corpus_mbpp_ids`` (default 511-974,
  the ids not used for evaluation);
- ``hf``: a Hugging Face dataset (hub name or local folder/file) read with ``streaming=True``, field
  ``corpus_field`` of split ``corpus_split``.

Every source passes through the same filters: CRLF -> LF, a length filter in characters, exact
de-duplication (whitespace-stripped text), and optionally ``corpus_exclude``: a problem set whose
statements are matched against the documents' problem statements (LeetCode records carry one), so that
training solutions of evaluation problems are dropped. Documents stream one at a time; only the
16-byte hashes of seen texts are kept for de-duplication.

Example::

    for doc in iter_documents(CorpusConfig(corpus="stdlib", corpus_limit=3)):
        print(doc.doc_id, len(doc.text))
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from empower.configs import option
from empower.jsonl import iter_jsonl


class CorpusFormat(str, enum.Enum):
    AUTO = "auto"
    STDLIB = "stdlib"
    FOLDER = "folder"
    JSONL = "jsonl"
    LEETCODE = "leetcode"
    MBPP = "mbpp"
    HF = "hf"


@dataclass(frozen=True)
class Document:
    """One training document; ``doc_id`` is stable across runs (resume relies on it)."""

    doc_id: str
    text: str
    statement: str | None = None  # the problem statement, when the source has one (for decontamination)


# Folders of the standard library that hold test fixtures, vendored code or generated data.
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


@dataclass(kw_only=True)
class CorpusConfig:
    corpus: str = option(
        "stdlib",
        "documents: 'stdlib' (Python's own library, offline), a folder, a .jsonl/.json file, "
        "or a Hugging Face dataset name/path (with --corpus-format hf)",
    )
    corpus_format: CorpusFormat = option(
        CorpusFormat.AUTO, "how to read --corpus; auto guesses from the path"
    )
    corpus_field: str = option("text", "JSONL / HF field that holds the document text")
    corpus_glob: str = option("**/*.py", "file pattern inside a folder corpus")
    corpus_split: str = option("train", "HF dataset split")
    corpus_min_chars: int = option(200, "drop documents shorter than this (characters)")
    corpus_max_chars: int = option(20_000, "drop documents longer than this (characters)")
    corpus_dedup: bool = option(True, "drop exact duplicates (whitespace-stripped text)")
    corpus_limit: int | None = option(None, "stop after this many documents (after filtering)")
    corpus_mbpp_ids: str = option("511-974", "MBPP task ids to use, 'A-B' inclusive (11-510 are evaluation)")
    corpus_exclude: Path | None = option(
        None, "a problem set (JSON list or JSONL with a 'problem' field) whose problems are removed"
    )

    def __post_init__(self):
        if self.corpus_min_chars < 0 or self.corpus_max_chars < self.corpus_min_chars:
            raise ValueError(
                f"corpus_min_chars={self.corpus_min_chars} / corpus_max_chars={self.corpus_max_chars}: "
                "need 0 <= min <= max"
            )
        if self.corpus_limit is not None and self.corpus_limit < 1:
            raise ValueError(f"corpus_limit must be at least 1, got {self.corpus_limit}")
        _parse_id_range(self.corpus_mbpp_ids)


def _parse_id_range(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not match or int(match[1]) > int(match[2]):
        raise ValueError(f"corpus_mbpp_ids must look like '511-974' (low-high), got {text!r}")
    return int(match[1]), int(match[2])


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def resolve_format(config: CorpusConfig) -> CorpusFormat:
    """The concrete format of ``config.corpus``; a missing path is a FileNotFoundError naming it."""
    if config.corpus_format is not CorpusFormat.AUTO:
        return config.corpus_format
    if config.corpus == "stdlib":
        return CorpusFormat.STDLIB
    path = Path(config.corpus).expanduser()
    if path.is_dir():
        return CorpusFormat.FOLDER
    if not path.exists():
        raise FileNotFoundError(
            f"corpus {config.corpus!r}: no such file or folder (for a Hugging Face dataset pass "
            "--corpus-format hf)"
        )
    first = _first_record(path)
    if isinstance(first, dict) and "solutions" in first:
        return CorpusFormat.LEETCODE
    if isinstance(first, dict) and {"task_id", "code", "test_list"} <= set(first):
        return CorpusFormat.MBPP
    return CorpusFormat.JSONL


def _first_record(path: Path):
    """The first record of a JSON list or JSONL file (None when neither), for format detection."""
    with _open_text(path) as fh:
        head = fh.read(1 << 16)
    if head.lstrip().startswith("["):
        records = _load_json(path)
        return records[0] if records else None
    try:
        return json.loads(head.splitlines()[0]) if head.strip() else None
    except (json.JSONDecodeError, IndexError):
        return None


def _open_text(path: Path):
    try:
        return open(path, encoding="utf-8")
    except OSError as err:
        raise FileNotFoundError(f"corpus file {path} cannot be read: {err}") from err


def _load_json(path: Path):
    with _open_text(path) as fh:
        try:
            return json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON: {err}") from err


def _field(record: dict, field: str, where: str) -> str:
    if field not in record:
        raise ValueError(
            f"{where}: no field {field!r} (fields: {', '.join(sorted(record))}); set --corpus-field"
        )
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} is {type(value).__name__}, expected text")
    return value


def _read_file(path: Path) -> str | None:
    """A source file's text, or None for files that are not UTF-8 (binary or legacy encodings)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None
    except OSError as err:
        raise FileNotFoundError(f"corpus file {path} cannot be read: {err}") from err


def _stdlib() -> Iterator[Document]:
    root = stdlib_root()
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in _STDLIB_SKIP)  # prune, and walk in order
        for name in sorted(files):
            if name.endswith(".py") and not name.startswith("test_"):
                path = Path(folder) / name
                text = _read_file(path)
                if text is not None:
                    yield Document(f"stdlib:{path.relative_to(root).as_posix()}", text)


def _folder(root: Path, pattern: str) -> Iterator[Document]:
    for path in sorted(root.glob(pattern)):
        if path.is_file():
            text = _read_file(path)
            if text is not None:
                yield Document(f"file:{path.relative_to(root).as_posix()}", text)


def _jsonl(path: Path, field: str) -> Iterator[Document]:
    for number, record in iter_jsonl(path):
        yield Document(f"{path.name}:{number}", _field(record, field, f"{path}:{number}"))


def _leetcode(path: Path) -> Iterator[Document]:
    records = _load_json(path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of LeetCode records")
    for index, record in enumerate(records):
        where = f"{path}[{index}]"
        text = _field(record, "solutions", where)
        yield Document(f"leetcode:{index}", text, statement=record.get("problem"))


def _mbpp(path: Path, ids: str) -> Iterator[Document]:
    low, high = _parse_id_range(ids)
    for number, record in iter_jsonl(path):
        task_id = record.get("task_id")
        if not isinstance(task_id, int):
            raise ValueError(f"{path}:{number}: no integer field 'task_id'")
        if low <= task_id <= high:
            yield Document(f"mbpp:{task_id}", _field(record, "code", f"{path}:{number}"), record.get("text"))


def _hf(name: str, split: str, field: str) -> Iterator[Document]:
    """A Hugging Face dataset, streamed; local folders and data files use the same code path."""
    import datasets

    path = Path(name).expanduser()
    if path.is_file():  # a single data file: let `datasets` pick the builder from its extension
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
        if builder is None:
            raise ValueError(
                f"corpus {name}: unsupported data file type {path.suffix!r} for --corpus-format hf"
            )
        stream = datasets.load_dataset(builder, data_files={split: str(path)}, split=split, streaming=True)
    else:
        try:
            stream = datasets.load_dataset(name, split=split, streaming=True)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"corpus {name!r}: Hugging Face dataset not found ({err})") from err
    for index, record in enumerate(stream):
        yield Document(
            f"{path.name or name}:{split}:{index}", _field(record, field, f"{name}[{split}][{index}]")
        )


def _normalize_statement(text: str) -> str:
    """Key for matching problem statements across sources (prompts' boilerplate first line dropped)."""
    if text.startswith("Please solve") and "\n\n" in text:
        text = text.split("\n\n", 1)[1]
    return re.sub(r"\W+", " ", text).lower().strip()[:100]


def load_exclusions(path: Path) -> set[str]:
    """Statement keys of a problem set (JSON list or JSONL records with ``problem``/``text``/``prompt``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus_exclude {path}: no such file")
    records = _load_json(path) if path.suffix == ".json" else [r for _, r in iter_jsonl(path)]
    keys = set()
    for record in records:
        text = next(
            (record[k] for k in ("problem", "question_content", "text", "prompt") if k in record), None
        )
        if isinstance(text, str) and text.strip():
            keys.add(_normalize_statement(text))
    if not keys:
        raise ValueError(f"corpus_exclude {path}: no records with a 'problem', 'text' or 'prompt' field")
    return keys


def iter_documents(config: CorpusConfig) -> Iterator[Document]:
    """Stream the filtered, de-duplicated documents of ``config`` (lazy: nothing is held in memory).

    Raises FileNotFoundError for a missing/unreadable source and ValueError naming file, line and
    field for malformed records (when the stream reaches them).
    """
    fmt = resolve_format(config)
    path = Path(config.corpus).expanduser()
    if fmt in (CorpusFormat.FOLDER, CorpusFormat.JSONL, CorpusFormat.LEETCODE, CorpusFormat.MBPP):
        if not path.exists():
            raise FileNotFoundError(f"corpus {config.corpus!r}: no such file or folder")
    sources = {
        CorpusFormat.STDLIB: lambda: _stdlib(),
        CorpusFormat.FOLDER: lambda: _folder(path, config.corpus_glob),
        CorpusFormat.JSONL: lambda: _jsonl(path, config.corpus_field),
        CorpusFormat.LEETCODE: lambda: _leetcode(path),
        CorpusFormat.MBPP: lambda: _mbpp(path, config.corpus_mbpp_ids),
        CorpusFormat.HF: lambda: _hf(config.corpus, config.corpus_split, config.corpus_field),
    }
    excluded = load_exclusions(config.corpus_exclude) if config.corpus_exclude else set()
    seen: set[bytes] = set()
    count = 0
    for doc in sources[fmt]():
        text = doc.text.replace("\r\n", "\n")
        if not config.corpus_min_chars <= len(text) <= config.corpus_max_chars:
            continue
        if excluded and doc.statement and _normalize_statement(doc.statement) in excluded:
            continue
        if config.corpus_dedup:
            digest = hashlib.blake2b(text.strip().encode(), digest_size=16).digest()
            if digest in seen:
                continue
            seen.add(digest)
        yield Document(doc.doc_id, text, doc.statement)
        count += 1
        if config.corpus_limit is not None and count >= config.corpus_limit:
            return
