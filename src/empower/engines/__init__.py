"""Engines: the few verbs every role asks of a language model, behind one interface.

``base`` holds the interface and its request/result types; ``local`` the in-process
``transformers`` engine. Roles (assistant policies, simulated humans, scoring, the server) receive an
engine; they never call ``generate`` themselves.
"""

from empower.engines.base import (
    Engine,
    Finish,
    GenerateRequest,
    Generation,
    ScoreRequest,
    decode_continuation,
    encode,
)

__all__ = [
    "Engine",
    "Finish",
    "GenerateRequest",
    "Generation",
    "ScoreRequest",
    "decode_continuation",
    "encode",
]
