"""The Empower rule, in one place: the longest completion whose cumulative NLL stays below eta.

Training pairs (:mod:`empower.labeling`, many cuts of a document from one cumulative sum), the
engines' NLL budget (generation stops before the token that would reach it) and a threshold policy
with a separate estimator all cut with these functions, so training and inference cannot disagree.
"""

from __future__ import annotations

import numpy as np


def empower_length(nll_bits_after_cut: np.ndarray, eta_bits: float) -> int:
    """Empower's ``k*`` for one prompt: the most tokens whose summed NLL stays below ``eta_bits``.

    ``nll_bits_after_cut[j]`` is the NLL (bits) of the (j+1)-th token after the prompt. Equivalent to the
    paper's loop (grow k while the total stays below eta) because NLLs are non-negative.

    >>> empower_length(np.array([0.1, 0.1, 0.5, 0.0]), 0.32)
    2
    """
    cumulative = np.cumsum(np.maximum(np.asarray(nll_bits_after_cut, dtype=np.float64), 0.0))
    return int(np.searchsorted(cumulative, eta_bits, side="left"))


def document_bits(nll_bits: np.ndarray, doc_id: str = "document") -> np.ndarray:
    """A document's NLLs ready to sum: float64, clipped at 0, ``[0]`` (no context, never a completion
    token) set to 0.

    A NaN anywhere else is an error: summed as 0 bits it would make ``k*`` silently too long.

    Raises:
        ValueError: naming ``doc_id`` and the first unscored positions.
    """
    nll = np.maximum(np.asarray(nll_bits, dtype=np.float64), 0.0)
    missing = np.flatnonzero(np.isnan(nll[1:])) + 1
    if missing.size:
        raise ValueError(
            f"{doc_id}: no NLL (NaN) at token position(s) {missing[:5].tolist()} of {len(nll)} "
            f"({missing.size} in all): the estimator gave NaN or the scorer skipped them"
        )
    nll[:1] = 0.0
    return nll


def empower_lengths(nll_bits: np.ndarray, cuts: np.ndarray, eta_bits: float) -> np.ndarray:
    """``k*`` for many cuts of one document from ONE cumulative sum (no re-scoring per k).

    Args:
        nll_bits: per-token NLL of the document, ``nll_bits[j] = -log2 p(d_j | d_<j)`` (``[0]`` unused;
            a NaN elsewhere raises, see :func:`document_bits`).
        cuts: prompt lengths ``n`` (1 <= n <= len(nll_bits)).
        eta_bits: the threshold.

    Returns:
        ``k`` per cut with ``sum(nll_bits[n:n+k]) < eta_bits`` and ``k`` maximal (at most ``len - n``).
    """
    nll = document_bits(nll_bits)
    cumulative = np.concatenate([[0.0], np.cumsum(nll)])  # cumulative[i] = sum(nll[:i])
    cuts = np.asarray(cuts, dtype=np.int64)
    first_over = np.searchsorted(cumulative, cumulative[cuts] + eta_bits, side="left")
    return np.minimum(first_over - 1, len(nll)) - cuts
