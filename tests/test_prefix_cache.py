"""Prompt key/value reuse across turns: suggestions must not change, only the work done for them.

Run: .venv/bin/pytest tests/test_prefix_cache.py
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from empower.assistant import AssistantConfig, Policy, SuggestionRequest, build_assistant
from empower.engines import GenerateRequest, encode
from empower.engines.local import LocalEngine
from empower.prefix_cache import PrefixCache, supports_prefix_cache

STATES = [
    'def add(a, b):\n    """Sum."""\n',
    "import os\n\n\ndef main():\n    path = os.getcwd()\n",
    "class Stack:\n    def __init__(self):\n",
    "x = [",
]
WRITTEN = ["    total = a", " + b\n", "    return total\n", "\n# the end\n"]


def _play(tiny, tiny_model_path, cache_size: int, policy: Policy, turns: int = 4, edit: bool = False):
    """Suggestions over turns where each state grows (or, with ``edit``, is rewritten mid-way)."""
    model, tokenizer = tiny
    config = AssistantConfig(
        assistant=tiny_model_path,
        policy=policy,
        eta=6.0,
        n=5,
        max_new_tokens=10,
        assistant_prefix_cache=cache_size,
    )
    assistant = build_assistant(config, model=model, tokenizer=tokenizer)
    states, seen = list(STATES), []
    for turn in range(turns):
        suggestions = assistant.suggest([SuggestionRequest(state=s) for s in states])
        seen.append(
            [
                (s.text, s.tokens, s.stop_reason, None if s.bits is None else round(s.bits, 4))
                for s in suggestions
            ]
        )
        states = [s + WRITTEN[(turn + i) % len(WRITTEN)] for i, s in enumerate(states)]
        if edit and turn == 1:
            states = [s.replace("\n", "\n# edited\n", 1) for s in states]
    return seen, assistant.engine.prefix_cache


@pytest.mark.parametrize("policy", [Policy.THRESHOLD, Policy.MODEL, Policy.BASE_N])
def test_suggestions_with_the_cache_equal_those_without(tiny, tiny_model_path, policy):
    without, none = _play(tiny, tiny_model_path, 0, policy)
    with_cache, cache = _play(tiny, tiny_model_path, 64, policy)
    assert none is None
    assert with_cache == without
    assert cache.reused_tokens > cache.encoded_tokens / 2  # later turns encode only what is new


def test_generated_tokens_and_their_bits_match_a_fresh_encoding(tiny):
    """The lowest level: every token's bits agree to float noise, turn after turn."""
    fresh_engine, reusing = LocalEngine(*tiny, prefix_cache=0), LocalEngine(*tiny, prefix_cache=16)
    states = list(STATES)
    for turn in range(3):
        requests = [GenerateRequest(p, 8) for p in encode(tiny[1], states)]
        fresh, reused = fresh_engine.generate(requests), reusing.generate(requests)
        for a, b in zip(fresh, reused, strict=True):
            assert a.ids == b.ids and a.prompt == b.prompt
            assert a.bits == pytest.approx(b.bits, abs=2e-5)  # float noise here is ~1e-6
        states = [s + WRITTEN[(turn + i) % len(WRITTEN)] for i, s in enumerate(states)]
    assert reusing.prefix_cache.reused_tokens > 0


def test_a_state_edited_mid_way_reuses_only_the_common_prefix(tiny, tiny_model_path):
    without, _ = _play(tiny, tiny_model_path, 0, Policy.THRESHOLD, edit=True)
    with_cache, cache = _play(tiny, tiny_model_path, 64, Policy.THRESHOLD, edit=True)
    assert with_cache == without and cache.reused_tokens > 0


def _states(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two layers of fake states for ``n`` tokens; token t's key holds the value t, to check slicing."""
    keys = torch.arange(n, dtype=torch.float32).view(1, n, 1).expand(2, n, 3).clone()
    return [(keys, keys + 100)] * 2


def test_lookup_takes_the_longest_common_prefix_and_leaves_the_last_token():
    cache = PrefixCache(8)
    cache.store([1, 2, 3, 4], _states(4))
    cache.store([1, 2, 9], _states(3))
    n, states = cache.lookup([1, 2, 3, 7, 7])
    assert n == 3 and states[0][0].shape == (2, 3, 3) and states[1][1][0, :, 0].tolist() == [100, 101, 102]
    assert cache.lookup([1, 2, 3, 4])[0] == 3  # a prompt seen whole still encodes its last token
    assert cache.lookup([5, 6]) == (0, None)


def test_an_extended_prompt_replaces_its_prefix_and_the_oldest_entry_goes_first():
    cache = PrefixCache(2)
    cache.store([1, 2], _states(2))
    cache.store([1, 2, 3], _states(3))
    assert len(cache) == 1  # [1, 2] is a prefix of [1, 2, 3]: kept once
    cache.store([4, 5], _states(2))
    cache.lookup([1, 2, 3, 0])  # touching [1, 2, 3] makes [4, 5] the oldest
    cache.store([6, 7], _states(2))
    assert cache.lookup([4, 5, 0]) == (0, None) and cache.lookup([1, 2, 3, 0])[0] == 3


def test_sliding_window_models_are_not_cached(tiny, tiny_model_path):
    assert supports_prefix_cache(tiny[0])
    config = AutoConfig.from_pretrained(tiny_model_path)
    config.layer_types = ["sliding_attention"] + ["full_attention"] * (config.num_hidden_layers - 1)
    model = AutoModelForCausalLM.from_config(config)
    assert not supports_prefix_cache(model)
    assistant = build_assistant(AssistantConfig(assistant=tiny_model_path), model=model, tokenizer=tiny[1])
    assert assistant.engine.prefix_cache is None


def test_negative_cache_size_is_refused_by_name():
    with pytest.raises(ValueError, match="assistant_prefix_cache"):
        AssistantConfig(assistant_prefix_cache=-1)


@pytest.mark.integration
def test_smollm2_suggestions_are_unchanged_by_the_cache(smol):
    """The embedded model, where a wrong position or mask would change real code suggestions."""
    fresh_engine, reusing = LocalEngine(*smol, prefix_cache=0), LocalEngine(*smol, prefix_cache=16)
    cache, states = reusing.prefix_cache, list(STATES)
    for turn in range(3):
        requests = [GenerateRequest(p, 12, budget_bits=8.0) for p in encode(smol[1], states)]
        fresh, reused = fresh_engine.generate(requests), reusing.generate(requests)
        assert [g.ids for g in reused] == [g.ids for g in fresh]
        for a, b in zip(fresh, reused, strict=True):
            assert a.bits == pytest.approx(b.bits, abs=1e-3)
        states = [s + WRITTEN[(turn + i) % len(WRITTEN)] for i, s in enumerate(states)]
    assert cache.reused_tokens > cache.encoded_tokens / 2
