"""Simulated humans behind one interface: shown a state and a suggestion, they decide and write.

- ``reference`` (:mod:`.reference`): deterministic and fast; it writes the task's reference program.
- ``llm`` (:mod:`.llm`): the paper's human, two LLM calls per turn, its model local or behind any
  OpenAI-compatible server (:mod:`.backends`).
- ``plausible`` (:mod:`.plausible`): writes like the reference human, accepts by how plausible a
  suggestion is to its model and how long it is, its defaults set from real programmers (:mod:`.study`).

Example::

    human = build_human(HumanConfig(human="reference"))
    [turn] = human.respond([HumanView(task=task, state=task.prompt, suggestion="    return a + b\\n")])
"""

from __future__ import annotations

from empower.humans.backends import (
    ChatAPI,
    ChatReply,
    ChatRequest,
    EngineChat,
    HoldStats,
    LocalChat,
    ServerChat,
    ending_tokens,
    generate_held,
)
from empower.humans.base import (
    Decision,
    Human,
    HumanConfig,
    HumanKind,
    HumanServerApi,
    HumanServerError,
    HumanTurn,
    HumanView,
)
from empower.humans.llm import LLMHuman, incomplete, parse_appended, parse_decision
from empower.humans.plausible import PlausibleHuman, accept_chance, plausibility_engine
from empower.humans.reference import ReferenceHuman, agrees, align, edit_distance
from empower.models import ModelPool


def build_human(
    config: HumanConfig, *, model=None, tokenizer=None, pool: ModelPool | None = None, counter=None
) -> Human:
    """The simulated human of ``config`` (``model``/``tokenizer``: an already loaded local LLM; ``pool``:
    where to load it, shared with the other roles; ``counter``: the run's counting tokenizer, which caps
    what the human writes at K_H tokens; default the SmolLM2 tokenizer).

    Raises HumanServerError when a server URL is unreachable after retries.
    """
    if config.human is HumanKind.REFERENCE:
        return ReferenceHuman(config, counter)
    if config.human is HumanKind.PLAUSIBLE:
        return PlausibleHuman(config, plausibility_engine(config, model, tokenizer, pool), counter)
    if config.human_url and config.human_server_api is HumanServerApi.CHAT:
        backend = ChatAPI(config.human_url, config)
    elif config.human_url:
        backend = ServerChat(config.human_url, config, tokenizer)
    else:
        backend = LocalChat(config.human_model, config, model, tokenizer, pool)
    return LLMHuman(config, backend, counter)


__all__ = [
    "ChatAPI", "ChatReply", "ChatRequest", "Decision", "EngineChat", "HoldStats", "Human", "HumanConfig",
    "HumanKind", "HumanServerApi", "HumanServerError", "HumanTurn", "HumanView", "LLMHuman", "LocalChat", "PlausibleHuman", "ReferenceHuman",
    "ServerChat", "accept_chance", "agrees", "align", "build_human", "edit_distance", "ending_tokens", "generate_held",
    "incomplete", "parse_appended", "parse_decision",
]  # fmt: skip
