"""An HTTP request's states to streamed suggestions, through the one policy module.

Both routes (``/v1/completions`` and ``/infill``) ask the policy (:class:`empower.assistant.PolicyAssistant`)
for the generate requests and for the suggestion a generation makes, exactly as ``empower eval`` does,
so a state gets one suggestion whichever route asks. Policies whose text is final as it comes
(``model``, ``threshold``) stream token by token; ``base`` and ``base-n`` clean and cap the whole reply,
so their suggestion goes out in one delta at the end.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from empower.assistant import PolicyAssistant, StopReason, SuggestionRequest
from empower.engines import GenerateRequest
from empower.engines.wrappers import Delta


async def suggestion_deltas(
    policy: PolicyAssistant,
    engine,
    states: list[SuggestionRequest],
    requests: list[GenerateRequest],
    logprobs: bool = False,
) -> AsyncIterator[Delta]:
    """Deltas of every request's suggestion (``engine``: anything with ``stream(requests, logprobs)``).

    Closing the iterator early cancels the requests still generating.
    """
    async with contextlib.aclosing(engine.stream(requests, logprobs=logprobs and policy.live)) as deltas:
        if policy.live:
            async for delta in deltas:
                yield delta
            return
        generated: dict[int, int] = {}
        async for delta in deltas:
            generated[delta.index] = generated.get(delta.index, 0) + delta.token_count
            if delta.finish_reason is None:
                continue
            suggestion = policy.finish(states[delta.index], delta.generation)
            ended = "length" if suggestion.stop_reason == StopReason.MAX_TOKENS.value else "stop"
            yield Delta(delta.index, suggestion.text, token_count=generated[delta.index], finish_reason=ended)
