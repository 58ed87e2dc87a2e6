"""Assistant policies on the tiny model: stop rules, caps, batching, and plugin-style cleanup of chatty
output on hand-made replies.

Run: .venv/bin/pytest tests/test_assistant.py
"""

from __future__ import annotations

import copy
import math

import pytest

from empower.assistant import (
    AssistantConfig,
    Policy,
    PolicyAssistant,
    SuggestionRequest,
    build_assistant,
    cap_tokens,
    chat_prompt,
    decode_continuation,
    extract_addition,
    extract_code,
)
from empower.engines import Finish, GenerateRequest, ScoreRequest, encode
from empower.engines.local import LocalEngine, finish_row
from empower.rule import empower_length

STATE = "def add(a, b):\n    "
STATES = ["def add(a, b):\n    ", "import os\n\n\ndef main():\n    path = os.getcwd()\n    ", "x = ["]


def assistant(tiny, tiny_model_path, **fields):
    model, tokenizer = tiny
    config = AssistantConfig(assistant=tiny_model_path, max_new_tokens=12, **fields)
    return build_assistant(config, model=model, tokenizer=tokenizer)


def requests(states=STATES):
    return [SuggestionRequest(state=s) for s in states]


# ---------------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("bits", "eta", "k"),
    [
        ([], 1.0, 0),
        ([2.0], 1.0, 0),
        ([0.5, 0.4], 1.0, 2),
        ([0.5, 0.5, 0.1], 1.0, 1),
        ([0.1, 0.2, 5.0, 0.1], 1.0, 2),
    ],
)
def test_the_rule_on_a_list_keeps_the_longest_prefix_strictly_below_eta(bits, eta, k):
    assert empower_length(bits, eta) == k


# ---------------------------------------------------------------------------------- policies


def test_threshold_stops_where_one_pass_scoring_of_the_full_generation_says(tiny, tiny_model_path):
    """In-generation stopping == generating freely, scoring the tokens in one pass, then cutting."""
    _, tokenizer = tiny
    eta = 40.0  # the random model spends ~15 bits a token: the rule cuts after two or three
    cut = assistant(tiny, tiny_model_path, policy="threshold", eta=eta).suggest(requests())
    engine = LocalEngine(*tiny)
    free = engine.generate([GenerateRequest(p, 12) for p in encode(tokenizer, STATES)])
    scored = engine.score([ScoreRequest(g.prompt, g.ids) for g in free])
    for c, g, logprobs in zip(cut, free, scored, strict=True):
        bits = [-lp / math.log(2) for lp in logprobs]
        k = empower_length(bits, eta)
        assert 0 < k < len(g.ids)
        assert (c.tokens, c.stop_reason) == (k, "threshold")
        assert c.text == decode_continuation(tokenizer, g.prompt, g.ids[:k])
        assert c.bits == pytest.approx(sum(bits[:k]), abs=1e-3) and c.bits < eta


def test_threshold_with_a_separate_estimator_cuts_the_same_as_in_generation(tiny, tiny_model_path):
    model, tokenizer = tiny
    config = AssistantConfig(assistant=tiny_model_path, policy="threshold", eta=40.0, max_new_tokens=12)
    engine = LocalEngine(model, tokenizer)
    inline = PolicyAssistant(config, engine).suggest(requests())
    scored = PolicyAssistant(config, engine, estimator=LocalEngine(model, tokenizer)).suggest(requests())
    assert [(s.text, s.tokens, s.stop_reason) for s in scored] == [
        (s.text, s.tokens, s.stop_reason) for s in inline
    ]
    assert [s.bits for s in scored] == pytest.approx([s.bits for s in inline], abs=1e-3)


def test_threshold_below_the_first_token_suggests_nothing(tiny, tiny_model_path):
    [s] = assistant(tiny, tiny_model_path, policy="threshold", eta=0.01).suggest(requests([STATE]))
    assert (s.text, s.tokens, s.stop_reason) == ("", 0, "empty")


def test_model_policy_runs_to_its_budget_and_reports_its_bits(tiny, tiny_model_path):
    for s in assistant(tiny, tiny_model_path, policy="model").suggest(requests()):
        assert (s.tokens, s.stop_reason) == (12, "max_tokens")  # the random model never says EOS
        assert s.bits > 0


def test_base_n_caps_suggestions_at_n_tokens(tiny, tiny_model_path):
    _, tokenizer = tiny
    suggestions = assistant(tiny, tiny_model_path, policy="base-n", n=3).suggest(requests())
    for s in suggestions:
        assert len(tokenizer(s.text, add_special_tokens=False)["input_ids"]) == s.tokens <= 3
    assert any(s.stop_reason == "cap" for s in suggestions)


@pytest.mark.parametrize("prefill", [True, False])
def test_base_suggestions_never_contain_the_fence_or_the_retyped_state(tiny, tiny_model_path, prefill):
    for request, s in zip(
        requests(),
        assistant(tiny, tiny_model_path, policy="base", base_prefill=prefill).suggest(requests()),
        strict=True,
    ):
        assert "```" not in s.text
        assert not (request.state.strip() and s.text.startswith(request.state))


def test_batched_suggestions_equal_one_at_a_time(tiny, tiny_model_path):
    """Left padding must not change what a request gets; results come back in request order."""
    batched = assistant(tiny, tiny_model_path, policy="model").suggest(requests())
    alone = [assistant(tiny, tiny_model_path, policy="model").suggest(requests([s]))[0] for s in STATES]
    assert [s.text for s in batched] == [s.text for s in alone]


class ScriptedEngine:
    """An engine that 'generates' a fixed text (so a test can make a model write a fence)."""

    name = "scripted"

    def __init__(self, tokenizer, text: str):
        self.tokenizer, self.text = tokenizer, text

    def generate(self, requests):
        ids = self.tokenizer(self.text, add_special_tokens=False)["input_ids"]
        return [finish_row(self.tokenizer, r, ids, [-0.1] * len(ids), Finish.STOP) for r in requests]


def test_a_code_fence_ends_a_suggestion_like_eos(tiny, tiny_model_path):
    config = AssistantConfig(assistant=tiny_model_path, policy="model", max_new_tokens=64)
    engine = ScriptedEngine(tiny[1], "y = 2\n```\n\nThis sets y.")
    [s] = PolicyAssistant(config, engine).suggest(requests(["x = 1\n"]))
    assert (s.text, s.stop_reason) == ("y = 2\n", "eos")
    assert s.tokens == len(tiny[1]("y = 2\n", add_special_tokens=False)["input_ids"])


def test_an_empty_state_gets_a_suggestion(tiny, tiny_model_path):
    [s] = assistant(tiny, tiny_model_path, policy="model").suggest(requests([""]))
    assert s.tokens == 12


def test_name_says_model_and_policy(tiny, tiny_model_path):
    assert assistant(tiny, tiny_model_path, policy="base-n", n=20).name == "tiny-random:base-20"
    assert assistant(tiny, tiny_model_path, policy="threshold", eta=4).name == "tiny-random:threshold-eta4"


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"n": 0}, "n"),
        ({"eta": 0}, "eta"),
        ({"assistant_temperature": -1}, "assistant_temperature"),
        ({"policy": "model", "estimator": "x"}, "estimator"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_config_rejects_bad_values_by_name(fields, name):
    with pytest.raises(ValueError, match=name):
        AssistantConfig(**fields)


def test_config_rejects_an_unknown_policy():
    with pytest.raises(ValueError, match="beam"):
        AssistantConfig(policy="beam")


def test_base_on_a_model_without_chat_template_is_a_clear_error(tiny):
    tokenizer = copy.deepcopy(tiny[1])
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        chat_prompt(tokenizer, STATE)


# A reasoning model's template (Qwen3's rule): it thinks unless enable_thinking is false; this one
# refuses to render a prompt that would let it think.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if enable_thinking is not defined or enable_thinking %}{{ raise_exception('this prompt would think') }}"
    "{% endif %}{% if add_generation_prompt %}<|assistant|><think>\n\n</think>\n\n{% endif %}"
)


def test_base_asks_a_reasoning_model_not_to_think(tiny):
    tokenizer = copy.deepcopy(tiny[1])
    tokenizer.chat_template = THINKING_TEMPLATE
    text = chat_prompt(tokenizer, STATE)
    assert "<|assistant|><think>\n\n</think>\n\n```python\n" + STATE == text[text.index("<|assistant|>") :]


def test_policy_enum_values():
    assert [p.value for p in Policy] == ["model", "base", "base-n", "threshold"]


# ---------------------------------------------------------------------------------- chatty replies

CODE = 'def add(a, b):\n    """Add."""\n'
BODY = "    return a + b\n"


@pytest.mark.parametrize(
    "reply",
    [
        f"```python\n{CODE}{BODY}```",  # the paper's protocol: retyped and extended, fenced
        f"Sure! Here is the completed code:\n\n```python\n{CODE}{BODY}```\n\nThis function adds a and b.",
        f"Here is the code:\n{CODE}{BODY}\nThis returns the sum.",  # no fence, prose around
        f"```python\n{CODE.rstrip()}\n{BODY}```",  # retyped without the trailing newline
        f"```\n{BODY}```",  # only the continuation
        f"```py\n{CODE}{BODY}",  # the fence never closed (cut by the token budget)
        f"```python\n{CODE.replace('Add.', 'Add')}{BODY}```",  # retyped with a small slip
        f"{BODY}",  # plain continuation, nothing to strip
    ],
)
def test_extract_addition_keeps_only_what_the_model_added(reply):
    assert extract_addition(CODE, reply) == BODY


def test_extract_addition_after_a_retype_of_only_the_last_line():
    state = "def add(a, b):\n    return "
    assert extract_addition(state, "```python\n    return a + b\n```") == "a + b\n"


def test_extract_addition_drops_a_second_retype_of_the_code():
    state = 'from typing import List\n\n\ndef mean(xs: List[float]) -> float:\n    """Average of xs."""\n'
    reply = f"```python\n{state}\n# Original code\n{state[25:]}    return sum(xs) / len(xs)\n```"
    assert extract_addition(state, reply) == "    return sum(xs) / len(xs)\n"


def test_extract_addition_of_a_cut_off_retype_is_empty():
    assert extract_addition(CODE, f"```python\n{CODE[:12]}") == ""


def test_extract_code_takes_the_first_block_only():
    assert extract_code("```python\nx = 1\n```\nor\n```python\nx = 2\n```") == "x = 1\n"


def test_cap_tokens_cuts_at_exactly_n_tokens(tiny):
    tokenizer = tiny[1]
    text, capped = cap_tokens("total = first + second + third\n", tokenizer, 4)
    assert capped and len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 4
    assert "total = first + second + third\n".startswith(text)
    assert cap_tokens("x", tokenizer, 4) == ("x", False)


def test_the_rule_with_infinite_eta_keeps_everything():
    assert empower_length([30.0] * 5, math.inf) == 5
