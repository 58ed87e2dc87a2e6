"""The reference human: deterministic and fast.

It intends the task's reference program and accepts a suggestion that agrees with what it intends
to write next (exactly at tolerance 0; near misses at tolerance > 0, so it can take in a bug), then
writes the next chunk of at most ``human_max_tokens`` tokens of its intent. With ``human_repair``
> 0 it re-reads a near miss it has just accepted and, with that chance, notices where it differs
from its intent and deletes it from there. The rule is in docs/assistants-and-humans.md.
"""

from __future__ import annotations

import difflib
import os
import random

from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

from empower import models
from empower.assistant import cap_tokens
from empower.humans.base import Decision, HumanConfig, HumanTurn, HumanView


def align(state: str, intent: str) -> int:
    """Where in ``intent`` the ``state`` ends: the human's position in its own plan.

    1. After the longest common prefix (cut back to a line start), whole lines are matched with
       difflib (blank lines cannot anchor a match); the last matched line is an anchor.
    2. The state's tail after the anchor is aligned against the start of the intent after it: the
       intent prefix with the smallest edit distance to the tail (ties: the length closest to the
       tail's). A tail within edit distance a third of its non-blank length is a near miss of that
       intent text, which
       the human then counts as written; a less similar tail is text the intent lacks, and the human
       goes on from the anchor.
    """
    if intent.startswith(state):
        return len(state)
    common = len(os.path.commonprefix([state, intent]))
    common = state.rfind("\n", 0, common) + 1  # a line start (0 if none)
    state_lines = state[common:].splitlines(keepends=True)
    intent_lines = intent[common:].splitlines(keepends=True)
    matcher = difflib.SequenceMatcher(
        lambda line: not line.strip(), state_lines, intent_lines, autojunk=False
    )
    blocks = [b for b in matcher.get_matching_blocks() if b.size]
    a_end, b_end = (blocks[-1].a + blocks[-1].size, blocks[-1].b + blocks[-1].size) if blocks else (0, 0)
    anchor = common + sum(map(len, intent_lines[:b_end]))
    tail = "".join(state_lines[a_end:])
    if not tail:
        return anchor
    window = intent[anchor : anchor + 2 * len(tail) + 16]
    length, distance = _closest_prefix(tail, window)
    return anchor + length if distance <= len(tail.strip()) / 3 else anchor


def _closest_prefix(text: str, target: str) -> tuple[int, int]:
    """``(j, d)``: the prefix ``target[:j]`` at the smallest edit distance ``d`` from ``text``
    (ties: the length closest to ``text``'s)."""
    row = cdist([text], [target[:j] for j in range(len(target) + 1)], scorer=Levenshtein.distance)[0]
    best = int(row.min())
    return min((j for j, d in enumerate(row) if d == best), key=lambda j: abs(j - len(text))), best


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions)."""
    return Levenshtein.distance(a, b)


def agrees(suggestion: str, remaining: str, tolerance: float) -> bool:
    """Whether a suggestion agrees with the intended continuation ``remaining``.

    Exact agreement: the suggestion is a prefix of ``remaining`` (or all of it). With tolerance t > 0
    also ``edit_distance(suggestion, remaining[:len(suggestion)]) / len(suggestion) <= t``.
    """
    if remaining.startswith(suggestion):
        return True
    if tolerance <= 0:
        return False
    budget = tolerance * len(suggestion)
    target = remaining[: len(suggestion)]
    if len(suggestion) - len(target) > budget:
        return False
    return edit_distance(suggestion, target) <= budget


class ReferenceHuman:
    """Writes the task's reference program; accepts suggestions that agree with it (see :func:`agrees`)."""

    def __init__(self, config: HumanConfig, tokenizer=None):
        self.config = config
        self.tokenizer = tokenizer or models.load_tokenizer(models.DEFAULT_MODEL)  # counts K_H
        tolerance, repair = config.human_tolerance, config.human_repair
        self.name = (
            "reference"
            + (f"-tol{tolerance:g}" if tolerance else "")
            + (f"-repair{repair:g}" if repair else "")
        )

    def respond(self, views: list[HumanView]) -> list[HumanTurn]:
        remaining = [self._remaining(view) for view in views]
        playing = [i for i, rest in enumerate(remaining) if rest.strip()]
        accepts = self._accepts([views[i] for i in playing], [remaining[i] for i in playing])
        turns = [HumanTurn(Decision.FINISH) for _ in views]  # its intent is written: it finishes
        for i, accept in zip(playing, accepts, strict=True):
            turns[i] = self._turn(views[i], remaining[i], accept)
        return turns

    def _remaining(self, view: HumanView) -> str:
        """What the human still means to write after the program ``view.state``."""
        intent = view.task.reference
        if intent is None:
            raise ValueError(
                f"task {view.task.task_id} has no reference solution; the {self.name} human needs one "
                "(use --human llm, or a problem set with solutions)"
            )
        return intent[align(view.state, intent) :]

    def _accepts(self, views: list[HumanView], remaining: list[str]) -> list[bool]:
        """The accept rule (:func:`agrees`), for every view at once (a subclass may score them)."""
        tolerance = self.config.human_tolerance
        return [agrees(v.suggestion, rest, tolerance) for v, rest in zip(views, remaining, strict=True)]

    def _turn(self, view: HumanView, remaining: str, accept: bool) -> HumanTurn:
        """Accept or reject, repair what it notices, then write the next chunk of its intent."""
        deleted = 0
        if accept and view.suggestion:
            kept = view.suggestion
            if not remaining.startswith(kept) and self._notices(view):
                kept = os.path.commonprefix([kept, remaining])  # delete from the first difference on
                deleted = len(view.suggestion) - len(kept)
            state = view.state + kept
            remaining = view.task.reference[align(state, view.task.reference) :]
        written = self._chunk(remaining) if remaining.strip() else ""
        return HumanTurn(Decision.ACCEPT if accept else Decision.REJECT, written, deleted=deleted)

    def _notices(self, view: HumanView) -> bool:
        """Whether the human notices the near miss it accepted: a draw with chance ``human_repair``,
        seeded by the task, the program and the suggestion, so that a run replays exactly and every
        assistant's same suggestion in the same place meets the same human."""
        seed = f"{view.task.task_id}\0{view.state}\0{view.suggestion}"
        return random.Random(seed).random() < self.config.human_repair  # in [0, 1): p = 1 always

    def _chunk(self, text: str) -> str:
        return cap_tokens(text, self.tokenizer, self.config.human_max_tokens)[0]
