"""What every simulated human shares: its config, the view it is shown and the turn it returns.

Each turn a human returns a :class:`HumanTurn`: ACCEPT (the suggestion is appended, then
``written``), REJECT (only ``written`` is appended) or FINISH (the episode ends after ``written``).
A human that repairs also deletes ``deleted`` characters from the end of the program (after an
accepted suggestion is appended, before ``written``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from empower import models
from empower.configs import check_url, option
from empower.humans.study import PAPER_STUDY, length_slope

if TYPE_CHECKING:
    from empower.tasks import Task


class Decision(str, enum.Enum):
    ACCEPT = "accept"
    REJECT = "reject"
    FINISH = "finish"


class HumanKind(str, enum.Enum):
    REFERENCE = "reference"
    LLM = "llm"
    PLAUSIBLE = "plausible"

    @property
    def intends_reference(self) -> bool:
        """Whether this human writes the task's reference program (so a task needs a passing one)."""
        return self is not HumanKind.LLM

    @property
    def has_model(self) -> bool:
        return self is not HumanKind.REFERENCE


class HumanServerApi(str, enum.Enum):
    """How a human's server is asked: completions of token-id prompts built here, or chat."""

    COMPLETIONS = "completions"
    CHAT = "chat"


@dataclass
class HumanView:
    task: Task
    state: str
    suggestion: str


@dataclass
class HumanTurn:
    decision: Decision
    written: str = ""
    malformed: bool = False  # the model's answer could not be parsed (logged; a default was used)
    raw: dict | None = None  # llm: the model's answers {"acceptor": ..., "appender": ...}, saved in the trace
    deleted: int = 0  # characters deleted from the program's end before ``written`` (a repair)


class Human(Protocol):
    name: str

    def respond(self, views: list[HumanView]) -> list[HumanTurn]: ...


class HumanServerError(ConnectionError):
    """The simulated human's server could not be reached (or refused the request) after retries."""


@dataclass
class HumanConfig:
    human: HumanKind = option(HumanKind.REFERENCE, "simulated human: reference | llm | plausible")
    human_model: str = option(
        models.HUMAN_MODEL,
        "llm, plausible: the human's model (local path, embedded name or hub id); with human_url, where "
        "its tokenizer and chat template come from",
    )
    human_url: str = option(
        "",
        "llm, plausible: base URL of an OpenAI-compatible server running the human's model, e.g. http://127.0.0.1:8001/v1",
    )
    human_served_model: str = option(
        "",
        "llm, plausible (server): the model name the server serves it under (empty: the one model it lists)",
    )
    human_server_api: HumanServerApi = option(
        HumanServerApi.COMPLETIONS,
        "llm (server): completions (token-id prompts built here, the reply prefilled and held open as "
        "in-process; vLLM, empower serve) | chat (the server's chat completions; for servers that take "
        "no token ids, e.g. llama.cpp's)",
    )
    human_tolerance: float = option(
        0.0, "reference: largest normalized edit distance of an accepted suggestion (0 = exact agreement)"
    )
    human_repair: float = option(
        0.0,
        "reference, plausible: chance that the human, re-reading a near miss it has just accepted against its "
        "intent, notices it and deletes the suggestion from where it differs (then writes on)",
    )
    human_accept_rate: float = option(
        PAPER_STUDY[0].acceptance,
        f"plausible: chance of accepting a suggestion of {PAPER_STUDY[0].mean_length} characters that is "
        "exactly as surprising to its model as its own code (default: the paper's study, Empower's "
        "acceptance at its mean length)",
    )
    human_length_slope: float = option(
        round(length_slope(), 4),
        "plausible: log-odds of accepting lost per doubling of a suggestion's length (default: the "
        "paper's study, both arms' acceptance put down to length alone)",
    )
    human_surprise_slope: float = option(
        1.0,
        "plausible: log-odds of accepting lost per bit per character a suggestion is more surprising to "
        "its model than its own code (values tried: docs/assistants-and-humans.md)",
    )
    human_max_tokens: int = option(10, "K_H: most tokens the human writes per turn")
    human_max_new_tokens: int = option(48, "llm: generation budget of the appender (cut to K_H afterwards)")
    human_temperature: float = option(0.0, "llm: sampling temperature (0 = greedy)")
    human_batch_size: int = option(
        8, "llm, plausible (local): prompts per generate() or scoring call", resumable=True
    )
    human_prefix_cache: int = option(
        64,
        "llm (local): prompts whose key/value states are kept for the next turn's prompts (0: off)",
        resumable=True,
    )
    human_concurrency: int = option(8, "llm, plausible (server): requests in flight at once", resumable=True)
    human_timeout_s: float = option(
        120.0, "llm, plausible (server): timeout of one request (seconds)", resumable=True
    )
    human_retries: int = option(
        3, "llm, plausible (server): retries with exponential backoff before giving up", resumable=True
    )
    human_device: str = option(
        "", "llm, plausible (local): torch device (empty: CUDA when present, else CPU)", resumable=True
    )

    def __post_init__(self):
        self.human = HumanKind(self.human)
        for name in ("human_tolerance", "human_repair"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.human_accept_rate < 1.0:
            raise ValueError(f"human_accept_rate must be in (0, 1), got {self.human_accept_rate}")
        for name in ("human_length_slope", "human_surprise_slope"):
            if not 0.0 <= getattr(self, name) < float("inf"):
                raise ValueError(
                    f"{name} must be >= 0 (acceptance does not rise with length or surprise), got "
                    f"{getattr(self, name)}"
                )
        for name in ("human_max_tokens", "human_max_new_tokens", "human_batch_size", "human_concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.human_prefix_cache < 0:
            raise ValueError(f"human_prefix_cache must be >= 0, got {self.human_prefix_cache}")
        if self.human_retries < 0 or self.human_timeout_s <= 0 or self.human_temperature < 0:
            raise ValueError(
                f"need human_retries >= 0, human_timeout_s > 0, human_temperature >= 0; got "
                f"{self.human_retries}, {self.human_timeout_s}, {self.human_temperature}"
            )
        check_url("human_url", self.human_url)
        if self.human_model.startswith(("http://", "https://")):
            raise ValueError(
                f"human_model is a URL ({self.human_model}): put the server's URL in human_url and the "
                "model (where its tokenizer comes from) in human_model"
            )
        self.human_server_api = HumanServerApi(self.human_server_api)
