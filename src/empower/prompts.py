"""The one function that turns a code state into model input, for training AND inference.

Training pairs store the code prefix as ``prompt``; the assistant at inference sees the state.
Both go through :func:`build_prompt`, so the two cannot drift apart. The default is the code
as plain text (no chat template), which is what the estimator scored when the data was built.
"""

from __future__ import annotations

import enum


class PromptTemplate(str, enum.Enum):
    """How a state (and optionally the task statement) becomes model input."""

    PLAIN = "plain"  # the code state exactly as it is
    STATEMENT = "statement"  # the statement as a leading comment block, then the code state


def build_prompt(
    state: str, statement: str | None = None, template: PromptTemplate = PromptTemplate.PLAIN
) -> str:
    """Model input for a code ``state``.

    Example::

        >>> build_prompt("def f(x):\\n")
        'def f(x):\\n'
        >>> build_prompt("x = 1\\n", "Add one.", PromptTemplate.STATEMENT)
        '# Add one.\\nx = 1\\n'
    """
    template = PromptTemplate(template)
    if template is PromptTemplate.PLAIN or not statement:
        return state
    header = "".join(f"# {line}".rstrip() + "\n" for line in statement.strip().splitlines())
    return header + state


# Reasoning models (Qwen3 and the like) think first unless told not to; every chat this project makes
# wants a short answer (an acceptor's one word, a few lines of code), which thinking would use up.
NO_THINKING = {"enable_thinking": False}


def chat_text(tokenizer, messages: list[dict]) -> str:
    """``messages`` through the tokenizer's chat template, opened for the reply, without thinking.

    Templates that know no ``enable_thinking`` ignore it.
    """
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **NO_THINKING)
