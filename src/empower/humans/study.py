"""Published figures from real programmers that constrain the simulated humans; each is cited here,
once, and the humans' defaults are derived from them (docs/assistants-and-humans.md).

Ellis et al. 2025, "Training LLM Agents to Empower Humans", human study (18 participants, a
double-blind comparison of two assistants in a code editor; ../shared/paper.md): Empower's
suggestions were accepted 8.08% of the time against 6.18% for Base-20 (p = 0.0002), at mean lengths
of 43.6 and 82.2 characters, with 9.56 and 12.91 characters deleted from accepted suggestions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StudyArm:
    """One assistant as real programmers met it."""

    assistant: str
    acceptance: float  # accepted / shown
    mean_length: float  # characters per suggestion shown
    chars_deleted: float  # characters deleted from accepted suggestions


PAPER_STUDY = (
    StudyArm("Empower", acceptance=0.0808, mean_length=43.6, chars_deleted=9.56),
    StudyArm("Base-20", acceptance=0.0618, mean_length=82.2, chars_deleted=12.91),
)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def length_slope(arms: tuple[StudyArm, StudyArm] = PAPER_STUDY) -> float:
    """Log-odds of acceptance lost per doubling of a suggestion's length, were the two arms' acceptance
    different by length alone: an upper bound, since the shorter arm's suggestions were also chosen
    to be predictable (0.316 for the paper's study)."""
    short, long = sorted(arms, key=lambda arm: arm.mean_length)
    return (logit(short.acceptance) - logit(long.acceptance)) / math.log2(
        long.mean_length / short.mean_length
    )
