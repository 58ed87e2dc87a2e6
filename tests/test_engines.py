"""The in-process engine on the tiny random model: each stop rule per row, the two verbs agreeing
with each other and with plain ``transformers``, batching and the prefix cache changing nothing.

Run: .venv/bin/pytest tests/test_engines.py
"""

from __future__ import annotations

import asyncio
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import LogitsProcessor

from empower.engines import Finish, GenerateRequest, ScoreRequest, decode_continuation, encode
from empower.engines.local import LocalEngine
from empower.engines.wrappers import Slots

STATES = ["def add(a, b):\n    ", "import os\n\n\ndef main():\n    path = os.getcwd()\n    ", "x = ["]


@pytest.fixture
def engine(tiny):
    model, tokenizer = tiny
    return LocalEngine(model, tokenizer, batch_size=8, prefix_cache=0)


def prompts(tokenizer, states=STATES) -> list[list[int]]:
    return encode(tokenizer, states)


def free(engine, states=STATES, max_tokens=12):
    return engine.generate([GenerateRequest(p, max_tokens) for p in prompts(engine.tokenizer, states)])


def test_greedy_generation_equals_plain_transformers_one_prompt_at_a_time(engine, tiny):
    model, tokenizer = tiny
    for prompt, g in zip(prompts(tokenizer), free(engine), strict=True):
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=engine.pad_id
        )
        assert g.ids == out[0, len(prompt) :].tolist()
        assert g.text == decode_continuation(tokenizer, prompt, g.ids)
        assert g.finish is Finish.LENGTH and len(g.logprobs) == 12  # the random model never says EOS


def test_batched_equals_one_at_a_time_and_comes_back_in_request_order(engine):
    batched = free(engine)
    alone = [free(engine, [s])[0] for s in STATES]
    assert [g.ids for g in batched] == [g.ids for g in alone]
    for b, a in zip(batched, alone, strict=True):
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)


def test_generated_logprobs_equal_what_score_says_of_the_same_tokens(engine):
    generated = free(engine)
    scored = engine.score([ScoreRequest(g.prompt, g.ids) for g in generated])
    for g, logprobs in zip(generated, scored, strict=True):
        assert logprobs == pytest.approx(g.logprobs, abs=1e-4)
        assert g.bits == pytest.approx([-lp / math.log(2) for lp in logprobs], abs=1e-4)


def test_score_of_an_empty_continuation_is_empty_and_a_context_is_required(engine):
    [ids] = prompts(engine.tokenizer, [STATES[0]])
    assert engine.score([ScoreRequest(ids, []), ScoreRequest(ids[:2], ids[2:])])[0] == []
    with pytest.raises(ValueError, match="context"):
        ScoreRequest([], ids)


def test_the_nll_budget_keeps_the_longest_prefix_strictly_below_it(engine):
    budget = 40.0  # the random model spends ~15 bits a token: the cut comes after two or three
    unbounded = free(engine)
    cut = engine.generate([GenerateRequest(g.prompt, 12, budget_bits=budget) for g in unbounded])
    for g, c in zip(unbounded, cut, strict=True):
        k = len(c.ids)
        assert 0 < k < len(g.ids) and c.ids == g.ids[:k]
        assert sum(c.bits) < budget <= sum(g.bits[: k + 1])
        assert c.finish is Finish.BUDGET and c.text == decode_continuation(engine.tokenizer, g.prompt, c.ids)


def test_a_budget_below_the_first_token_generates_nothing(engine):
    [c] = engine.generate([GenerateRequest(prompts(engine.tokenizer)[0], 12, budget_bits=0.01)])
    assert (c.ids, c.text, c.logprobs, c.finish) == ([], "", [], Finish.BUDGET)


def test_each_row_keeps_its_own_stop_strings_and_token_budget(engine):
    """Rows of one batch end by their own rules; the others run on, unchanged."""
    unbounded = free(engine)
    first, second, third = unbounded
    stop = first.text[4:7]
    at = first.text.find(stop)
    made = engine.generate(
        [
            GenerateRequest(first.prompt, 12, stop=(stop,)),
            GenerateRequest(second.prompt, 5),
            GenerateRequest(third.prompt, 12, stop=("never in the text",)),
        ]
    )
    stopped, short, untouched = made
    assert (stopped.finish, stopped.stop, stopped.text) == (Finish.STOP, stop, first.text[:at])
    # The tokens kept are those that begin before the stop string.
    assert stopped.ids == first.ids[: len(stopped.ids)]
    assert len(decode_continuation(engine.tokenizer, first.prompt, stopped.ids[:-1])) < at
    assert len(decode_continuation(engine.tokenizer, first.prompt, stopped.ids)) >= at
    assert (short.ids, short.finish) == (second.ids[:5], Finish.LENGTH)
    assert (untouched.ids, untouched.finish) == (third.ids, Finish.LENGTH)


def test_a_stop_string_at_the_very_start_keeps_nothing(engine):
    g = free(engine, [STATES[0]])[0]
    [c] = engine.generate([GenerateRequest(g.prompt, 12, stop=(g.text[:2],))])
    assert (c.ids, c.text, c.finish) == ([], "", Finish.STOP)


class ForceAt(LogitsProcessor):
    """Forces ``token`` at step ``step`` of every row (to make the random model end on cue)."""

    def __init__(self, token: int, step: int):
        self.token, self.step, self.seen = token, step, 0

    def __call__(self, input_ids, scores):
        if self.seen == self.step:
            scores[:, :] = -math.inf
            scores[:, self.token] = 0.0
        self.seen += 1
        return scores


def test_end_of_sequence_ends_a_row_and_is_not_part_of_it(engine):
    eos = engine.eos_ids[0]
    unbounded = free(engine)
    ended = engine.generate(
        [GenerateRequest(g.prompt, 12) for g in unbounded], logits_processors=[ForceAt(eos, 3)]
    )
    for g, e in zip(unbounded, ended, strict=True):
        assert (e.ids, e.finish) == (g.ids[:3], Finish.EOS)
        assert len(e.logprobs) == 3


def test_sampling_is_seeded_and_its_logprobs_are_the_models_own(engine):
    requests = [GenerateRequest(p, 8, temperature=1.5) for p in prompts(engine.tokenizer)]
    torch.manual_seed(0)
    first = engine.generate(requests)
    torch.manual_seed(0)
    again = engine.generate(requests)
    assert [g.ids for g in first] == [g.ids for g in again]
    assert [g.ids for g in first] != [g.ids for g in free(engine, max_tokens=8)]
    scored = engine.score([ScoreRequest(g.prompt, g.ids) for g in first])
    for g, logprobs in zip(first, scored, strict=True):
        assert g.logprobs == pytest.approx(logprobs, abs=1e-4)  # before the temperature


def test_the_prefix_cache_changes_no_generation(tiny):
    model, tokenizer = tiny
    cached = LocalEngine(model, tokenizer, prefix_cache=8)
    plain = LocalEngine(model, tokenizer, prefix_cache=0)
    turn1 = [GenerateRequest(p, 6) for p in prompts(tokenizer)]
    first = cached.generate(turn1)
    turn2 = [GenerateRequest(list(g.prompt) + g.ids, 6) for g in first]  # the next turn extends the last
    assert [g.ids for g in cached.generate(turn2)] == [g.ids for g in plain.generate(turn2)]
    assert cached.prefix_cache.reused_tokens > 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(prompt=[], max_tokens=4), "prompt token"),
        (dict(prompt=[1], max_tokens=0), "max_tokens"),
        (dict(prompt=[1], max_tokens=4, budget_bits=0.0), "budget_bits"),
        (dict(prompt=[1], max_tokens=4, temperature=-1.0), "temperature"),
        (dict(prompt=[1], max_tokens=4, stop=("",)), "stop strings"),
    ],
)
def test_bad_requests_are_refused_by_field(fields, message):
    with pytest.raises(ValueError, match=message):
        GenerateRequest(**fields)


def test_on_token_hears_exactly_the_kept_tokens_in_order(engine):
    """Streaming: the budget's crossing token is never heard, and every kept one is, as it comes."""
    heard: dict[int, list[tuple[int, float]]] = {0: [], 1: [], 2: []}
    requests = [GenerateRequest(p, 12, budget_bits=40.0) for p in prompts(engine.tokenizer)]
    made = engine.generate(requests, on_token=lambda i, token, lp, top: heard[i].append((token, lp)))
    for i, g in enumerate(made):
        assert g.finish is Finish.BUDGET
        assert [t for t, _ in heard[i]] == g.ids and [lp for _, lp in heard[i]] == g.logprobs


def test_a_cancelled_row_stops_and_the_others_run_on(engine):
    seen = {0: 0, 1: 0, 2: 0}

    def hear(i, *_):
        seen[i] += 1

    made = engine.generate(
        [GenerateRequest(p, 12) for p in prompts(engine.tokenizer)],
        on_token=hear,
        cancelled=lambda i: i == 1 and seen[1] >= 3,
    )
    assert made[1].finish is Finish.CANCELLED and len(made[1].ids) == 3
    assert [g.finish for g in (made[0], made[2])] == [Finish.LENGTH, Finish.LENGTH]


def test_top_logprobs_list_the_most_likely_alternatives(engine):
    [g] = engine.generate([GenerateRequest(prompts(engine.tokenizer)[0], 4, top_logprobs=3)])
    assert len(g.top_logprobs) == len(g.ids) == 4
    for token, logprob, top in zip(g.ids, g.logprobs, g.top_logprobs, strict=True):
        assert len(top) == 3 and max(top, key=top.get) == token  # greedy takes the most likely
        assert top[token] == pytest.approx(logprob)


def test_banned_tokens_are_never_generated_and_log_probs_stay_the_models_own(engine):
    unbanned = free(engine, max_tokens=6)
    banned = tuple(sorted({t for g in unbanned for t in g.ids}))
    requests = [GenerateRequest(p, 6, banned=banned) for p in prompts(engine.tokenizer)]
    requests.append(GenerateRequest(prompts(engine.tokenizer)[0], 6))  # a row without bans, same batch
    *made, plain = engine.generate(requests)
    assert all(not set(g.ids) & set(banned) and len(g.ids) == 6 for g in made)
    assert plain.ids == unbanned[0].ids
    [scored] = engine.score([ScoreRequest(requests[0].prompt, tuple(made[0].ids))])
    assert made[0].logprobs == pytest.approx(scored, abs=1e-4)  # the model's, not the banned distribution's


def test_a_tiny_top_p_samples_the_greedy_tokens(engine):
    sampled = engine.generate(
        [GenerateRequest(p, 6, temperature=1.0, top_p=1e-6) for p in prompts(engine.tokenizer)]
    )
    assert [g.ids for g in sampled] == [g.ids for g in free(engine, max_tokens=6)]


def test_slots_bound_holders_across_threads_and_survive_cancelled_waiters():
    """Four threads, each with its own event loop and three tasks: never more than two hold a slot;
    waiters that give up (timeouts) lose no slot, so both are free at the end."""
    slots, lock, now, most = Slots(2), threading.Lock(), [0], [0]

    async def hold(seconds: float) -> None:
        async with slots.slot():
            with lock:
                now[0] += 1
                most[0] = max(most[0], now[0])
            await asyncio.sleep(seconds)
            with lock:
                now[0] -= 1

    async def thread_work(k: int) -> None:
        impatient = asyncio.wait_for(hold(0.01), 0.001) if k % 2 else hold(0.01)
        results = await asyncio.gather(impatient, hold(0.02), hold(0.01), return_exceptions=True)
        assert all(r is None or isinstance(r, TimeoutError) for r in results)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda k: asyncio.run(thread_work(k)), range(4)))

    async def both_free() -> None:
        await asyncio.wait_for(
            asyncio.gather(slots.acquire(), slots.acquire()), 5.0
        )  # blocks if one was lost

    asyncio.run(both_free())
    assert most[0] == 2
