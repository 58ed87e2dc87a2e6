"""The plausible human: accepts a suggestion by how plausible it reads to its own model and how long
it is, not by whether it matches its intent.

A programmer rarely checks a suggestion against a plan character by character: they take it when it
reads like the code they expect and is short enough to take in at a glance, and real programmers'
acceptance falls as suggestions grow longer (:mod:`.study`). This human models both with a logit
choice rule. Its *surprise* at a suggestion is its bits per character under the human's model, given
the program so far, less the bits per character of the task's reference solution (its own code)
given the prompt, so a hard task is not held against the suggestion::

    log-odds(accept) = logit(human_accept_rate)
                       - human_surprise_slope * surprise
                       - human_length_slope * log2(characters / 43.6)

and it accepts on a draw with that chance, seeded by the task, the program and the suggestion, so a
run replays exactly and every assistant's same suggestion in the same place meets the same human.
Otherwise it is the reference human: it writes the reference program, finishes when that is
written, and with ``human_repair`` re-reads what it accepted and deletes it from where it differs.
The defaults come from the paper's study (:mod:`.study`); every value tried is listed in
docs/assistants-and-humans.md.
"""

from __future__ import annotations

import math
import os
import random

from empower import models
from empower.engines import ScoreRequest, encode
from empower.engines.local import LocalEngine
from empower.humans.base import HumanConfig, HumanServerApi, HumanTurn, HumanView
from empower.humans.reference import ReferenceHuman
from empower.humans.study import PAPER_STUDY, logit

REFERENCE_LENGTH = PAPER_STUDY[0].mean_length  # where human_accept_rate holds (characters)


def accept_chance(surprise: float, length: int, config: HumanConfig) -> float:
    """The rule: chance of accepting a suggestion of ``length`` characters, ``surprise`` bits per
    character more surprising to the human's model than its own code."""
    log_odds = (
        logit(config.human_accept_rate)
        - config.human_surprise_slope * surprise
        - config.human_length_slope * math.log2(length / REFERENCE_LENGTH)
    )
    return 1 / (1 + math.exp(-log_odds)) if log_odds > -700 else 0.0


class Plausibility:
    """Bits per character of a text after a context under the human's model (log-softmax in fp32,
    whatever the model's dtype); ``engine`` is in-process or a completions server (prompt logprobs)."""

    def __init__(self, engine):
        self.engine, self.tokenizer = engine, engine.tokenizer

    def bits_per_char(self, pairs: list[tuple[str, str]]) -> list[float]:
        """For each ``(context, text)``: bits of ``text`` given ``context`` per character. The two are
        tokenized together (as the model would read the program), so a token straddling their border
        is scored, with its characters, as part of ``text``."""
        requests, chars = [], []
        empty = encode(self.tokenizer, [""])[0]  # the start token that stands for no context
        for context, text in pairs:
            ids = encode(self.tokenizer, [context + text])[0]
            shared = len(os.path.commonprefix([encode(self.tokenizer, [context])[0], ids]))
            # No shared token: an empty context, or its only token merged with the text's.
            request = ScoreRequest(ids[:shared], ids[shared:]) if shared else ScoreRequest(empty, ids)
            requests.append(request)
            chars.append(len(self.tokenizer.decode(list(request.continuation))))
        logps = self.engine.score(requests) if requests else []
        return [-sum(lp) / math.log(2) / n if n else 0.0 for lp, n in zip(logps, chars, strict=True)]


class PlausibleHuman(ReferenceHuman):
    """The reference human whose accept decision is :func:`accept_chance`'s draw."""

    def __init__(self, config: HumanConfig, engine, tokenizer=None):
        super().__init__(config, tokenizer)
        self.backend = Plausibility(engine)  # ``backend.engine``: shared and checked like the LLM human's
        self.name = (
            f"plausible-rate{config.human_accept_rate:g}-len{config.human_length_slope:g}"
            f"-surprise{config.human_surprise_slope:g}"
            + (f"-repair{config.human_repair:g}" if config.human_repair else "")
        )
        self._own: dict[str, float] = {}  # task id -> bits per character of its reference solution
        self._why: dict[int, dict] = {}  # id(view) -> what the decision was drawn from, for the trace

    def _accepts(self, views: list[HumanView], remaining: list[str]) -> list[bool]:
        new = {v.task.task_id: v.task for v in views if v.task.task_id not in self._own}
        shown = [v for v in views if v.suggestion]  # nothing shown: a no-op accept, as for the reference
        pairs = [_split(task.prompt, task.reference) for task in new.values()]
        bits = self.backend.bits_per_char(pairs + [(v.state, v.suggestion) for v in shown])
        self._own.update(zip(new, bits[: len(new)], strict=True))
        for view, seen in zip(shown, bits[len(new) :], strict=True):
            own = self._own[view.task.task_id]
            chance = accept_chance(seen - own, len(view.suggestion), self.config)
            seed = f"accept\0{view.task.task_id}\0{view.state}\0{view.suggestion}"
            draw = random.Random(seed).random()
            self._why[id(view)] = {
                "bits_per_char": seen,
                "own_bits_per_char": own,
                "chance": chance,
                "draw": draw,
            }
        return [not v.suggestion or self._why[id(v)]["draw"] < self._why[id(v)]["chance"] for v in views]

    def _turn(self, view: HumanView, remaining: str, accept: bool) -> HumanTurn:
        turn = super()._turn(view, remaining, accept)
        turn.raw = self._why.pop(id(view), None)
        return turn


def _split(prompt: str, reference: str) -> tuple[str, str]:
    """The reference solution as the prompt's continuation: (what it shares with the prompt, the rest)."""
    shared = len(os.path.commonprefix([prompt, reference]))
    return reference[:shared], reference[shared:]


def plausibility_engine(
    config: HumanConfig, model=None, tokenizer=None, pool: models.ModelPool | None = None
):
    """The engine the plausible human scores with: its model in-process, or a completions server."""
    if config.human_url and config.human_server_api is HumanServerApi.CHAT:
        raise ValueError(
            "human plausible scores suggestions with its model's log-probabilities, which a chat "
            "completions API does not give: use --human-server-api completions (vLLM, empower serve)"
        )
    if config.human_url:
        from empower.humans.backends import human_server_engine

        return human_server_engine(config.human_url, config, tokenizer)
    if model is None:
        pool = pool if pool is not None else models.ModelPool()
        model, tokenizer = pool.load(config.human_model, device=config.human_device or None)
    return LocalEngine(model, tokenizer, batch_size=config.human_batch_size, name=config.human_model)
