"""JSON Lines reading for every file the pipeline consumes, so a bad record is always reported as
``path:line: ...`` (the form editors and terminals turn into a link)."""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def iter_jsonl(path: str | Path, *, cut_tail_ok: bool = False) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line of ``path`` (``.gz`` is read compressed).

    Args:
        cut_tail_ok: a last line that does not parse and lacks its newline is skipped with a warning, not
            raised: a run killed while appending (traces, pairs) leaves one, and the lines before are good.

    Raises:
        ValueError: ``path:line:`` and what is wrong, for a line that is not a JSON object.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if cut_tail_ok and not line.endswith("\n"):
                    log.warning(
                        "%s:%d: incomplete last line skipped (interrupted run): %s", path, number, err.msg
                    )
                    return
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


__all__ = ["iter_jsonl"]
