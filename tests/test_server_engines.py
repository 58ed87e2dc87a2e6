"""The assistant on a server (``--assistant-url``): a real ``empower serve`` process stands in for
vLLM, and every policy gives what the in-process engine gives, down to whole evaluation traces.

Run: .venv/bin/pytest tests/test_server_engines.py
"""

from __future__ import annotations

import json

import httpx
import pytest

from empower import models
from empower.assistant import AssistantConfig, Policy, PolicyAssistant, SuggestionRequest, build_assistant
from empower.cli import main
from empower.engines import GenerateRequest, ScoreRequest, encode
from empower.engines.local import LocalEngine
from empower.engines.openai import OpenAIEngine, ServerEngineError, served_model, server_engine
from empower.env import EvalConfig, run_eval
from empower.humans import ChatRequest, HumanConfig, LocalChat, ServerChat
from empower.labeling import DataConfig, build_data
from empower.metrics import read_traces
from flaky_proxy import Faults, flaky_proxy
from serve_process import free_port, serve_process

MODEL = "tiny-random"
STATES = ["def add(a, b):\n    ", "import os\n\n\ndef main():\n    path = os.getcwd()\n    ", "x = ["]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One `empower serve` for the module: the raw model (policy model); the client applies the policy."""
    with serve_process(
        ["--assistant", MODEL, "--max-tokens-limit", "256"], tmp_path_factory.mktemp("s") / "log"
    ) as url:
        yield url


@pytest.mark.parametrize("policy", list(Policy))
def test_every_policy_over_a_url_suggests_what_it_does_in_process(server, tiny, tiny_model_path, policy):
    fields = dict(assistant=tiny_model_path, policy=policy, n=3, eta=40.0, max_new_tokens=12)
    local = PolicyAssistant(AssistantConfig(**fields), LocalEngine(*tiny))
    remote = build_assistant(AssistantConfig(**fields, assistant_url=f"{server}/v1"))
    assert isinstance(remote.engine.engine, OpenAIEngine)
    requests = [SuggestionRequest(state) for state in STATES]
    here, there = local.suggest(requests), remote.suggest(requests)
    assert [(s.text, s.tokens, s.stop_reason) for s in there] == [
        (s.text, s.tokens, s.stop_reason) for s in here
    ]
    for a, b in zip(here, there, strict=True):
        assert (a.bits is None) == (b.bits is None) and (
            a.bits is None or a.bits == pytest.approx(b.bits, abs=1e-4)
        )
    if policy is Policy.THRESHOLD:  # the case is informative: eta cuts inside the budget
        assert any(s.stop_reason == "threshold" for s in there)


def test_the_budget_closes_the_stream_at_the_cut_with_the_ids_in_process_gives(server, tiny):
    tokenizer = tiny[1]
    requests = [GenerateRequest(p, 12, budget_bits=40.0) for p in encode(tokenizer, STATES)]
    remote = server_engine(server, served_model(server), tokenizer).generate(requests)
    for here, there in zip(LocalEngine(*tiny).generate(requests), remote, strict=True):
        assert (there.ids, there.text, there.finish) == (here.ids, here.text, here.finish)
        assert there.logprobs == pytest.approx(here.logprobs, abs=1e-4)


def test_banned_tokens_go_as_logit_bias_and_the_server_never_generates_them(server, tiny):
    tokenizer = tiny[1]
    local = LocalEngine(*tiny)
    free = local.generate([GenerateRequest(p, 6) for p in encode(tokenizer, STATES)])
    banned = tuple(sorted({t for g in free for t in g.ids}))
    requests = [GenerateRequest(p, 6, banned=banned) for p in encode(tokenizer, STATES)]
    remote = server_engine(server, served_model(server), tokenizer).generate(requests)
    for here, there in zip(local.generate(requests), remote, strict=True):
        assert (there.ids, there.text, there.finish) == (here.ids, here.text, here.finish)
        assert not set(there.ids) & set(banned)
    refused = httpx.post(
        f"{server}/v1/completions", json={"model": MODEL, "prompt": "x", "logit_bias": {"5": -3}}
    )
    assert refused.status_code == 400 and "applies only -100" in refused.json()["error"]["message"]


KEPT = ("task_id", "events", "program", "status", "passed", "tokens_read", "tokens_written", "suggestions",
        "accepted", "suggestion_tokens", "turns", "end_reason")  # fmt: skip


def eval_config(out, policy=Policy.BASE_N, **where) -> EvalConfig:
    fields = dict(assistant=models.resolve(models.TINY_MODEL), policy=policy, n=3, eta=40.0, human="reference",
                  tasks="humaneval", limit=2, max_new_tokens=8, out=out, metrics_resamples=100)  # fmt: skip
    return EvalConfig(**(fields | where))


def kept(run) -> list[dict]:
    return [{k: t[k] for k in KEPT} for t in read_traces(run / "traces.jsonl")]


@pytest.mark.parametrize("policy", [Policy.BASE_N, Policy.THRESHOLD])
def test_an_evaluation_through_the_url_gives_the_in_process_traces(server, tmp_path, policy):
    here = kept(run_eval(eval_config(tmp_path / "local", policy), progress=False))
    assert any(e["kind"] == "suggested" and e["text"] for t in here for e in t["events"])  # informative
    assert kept(run_eval(eval_config(tmp_path / "url", policy, assistant_url=server), progress=False)) == here


def test_requests_a_server_fails_are_retried_with_backoff_and_the_run_is_unchanged(server, tmp_path, caplog):
    here = kept(run_eval(eval_config(tmp_path / "local"), progress=False))
    faults = Faults(passing=2, failing=3)  # then three 503s: fewer than one request's 1 + 3 attempts
    with flaky_proxy(server, faults) as url:
        there = kept(run_eval(eval_config(tmp_path / "url", assistant_url=url), progress=False))
    assert there == here and faults.failed == 3
    assert sum("503" in r.message and "retry" in r.message and url in r.message for r in caplog.records) == 3


@pytest.mark.parametrize("loop", ["lockstep", "async"])
def test_requests_in_flight_never_exceed_the_engines_setting_under_either_loop(server, tmp_path, loop):
    """Six episodes in flight, each calling from its own thread under the async loop: at most
    assistant_batch_size (2) requests are out at once, and the traces are the in-process ones."""
    here = kept(run_eval(eval_config(tmp_path / "local", limit=6), progress=False))
    config = eval_config(tmp_path / "url", limit=6, assistant_url=server, sim_batch_size=6,
                         assistant_batch_size=2, sim_loop=loop)  # fmt: skip
    there = kept(run_eval(config, progress=False))
    assert sorted(there, key=lambda t: t["task_id"]) == sorted(here, key=lambda t: t["task_id"])
    counted = json.loads((tmp_path / "url" / "speed.json").read_text())["engines"]["assistant"]
    assert counted["requests"] > 6 and counted["most_in_flight"] == 2 and counted["in_flight"] == 0


@pytest.mark.parametrize("loop", ["lockstep", "async"])
def test_a_server_gone_mid_run_stops_it_in_one_line_and_resume_finishes_it(server, tmp_path, capsys, loop):
    here = kept(run_eval(eval_config(tmp_path / "local", limit=3), progress=False))
    out = tmp_path / "url"
    # The server answers 503 for good from the second turn of the second episode on.
    first = min(here, key=lambda t: t["task_id"])  # one episode at a time, in task order
    faults = Faults(passing=first["turns"] + 1, failing=None)
    with flaky_proxy(server, faults) as url:
        args = ["eval", "run", "--assistant", models.resolve(models.TINY_MODEL), "--policy", "base-n", "--n", "3",
                "--limit", "3", "--max-new-tokens", "8", "--sim-batch-size", "1", "--metrics-resamples", "100",
                "--assistant-url", url, "--out", str(out), "--sim-loop", loop]  # fmt: skip
        with pytest.raises(SystemExit) as stopped:
            main(args)
        message = capsys.readouterr().err
        finished = len(read_traces(out / "traces.jsonl"))
        assert stopped.value.code == 2 and finished == 1
        assert f"{url}#{MODEL}" in message and "503" in message and "injected failure" in message
        assert f"{finished} finished episode(s) are saved" in message and "--resume" in message
        faults.failing = faults.failed  # the server is back
        with pytest.raises(SystemExit) as resumed:
            main([*args, "--resume"])
    assert resumed.value.code in (0, None)
    assert sorted(kept(out), key=lambda t: t["task_id"]) == sorted(here, key=lambda t: t["task_id"])


def test_the_llm_human_on_a_server_replies_what_it_does_in_process(server, tiny, tiny_model_path):
    """Same prompt tokens, prefill and hold: held replies (blank tokens made ending) included."""
    config = HumanConfig(human="llm", human_model=tiny_model_path, human_url=f"{server}/v1")
    local, remote = LocalChat(tiny_model_path, config, *tiny), ServerChat(config.human_url, config)
    blank = {i for t, i in tiny[1].get_vocab().items() if not tiny[1].convert_tokens_to_string([t]).strip()}
    local.ending = remote.ending = blank
    messages, prefill = [{"role": "user", "content": "Continue the code."}], "```python\n" + STATES[0]
    requests = [
        ChatRequest(messages, 6, prefill, lambda added: True),
        ChatRequest(messages, 6, prefill, lambda added: len(added) < 4),
        ChatRequest(messages, 6, prefill),
        ChatRequest([{"role": "user", "content": "Reply ACCEPT or REJECT."}], 4),
    ]
    here, there = local.complete(requests), remote.complete(requests)
    assert [(r.text, r.closed) for r in there] == [(r.text, r.closed) for r in here]
    assert remote.hold_stats == local.hold_stats and local.hold_stats.held > 0


def test_an_evaluation_with_the_llm_human_on_a_server_gives_the_in_process_traces(
    server, tiny_model_path, tmp_path
):
    def traces(**where):
        config = EvalConfig(assistant=tiny_model_path, policy="base-n", n=3, human="llm", human_model=tiny_model_path,
                            human_max_tokens=4, human_max_new_tokens=8, sim_max_rounds=3, tasks="humaneval", limit=2,
                            max_new_tokens=8, out=tmp_path / ("url" if where else "local"), metrics_resamples=100,
                            **where)  # fmt: skip
        return [
            {k: t[k] for k in (*KEPT, "human", "human_answers")}
            for t in read_traces(run_eval(config, progress=False) / "traces.jsonl")
        ]

    here, there = traces(), traces(human_url=f"{server}/v1")
    assert all(a["acceptor"] and a["appender"] for t in here for a in t["human_answers"][1:])  # both asked
    assert [{**t, "human": None} for t in there] == [{**t, "human": None} for t in here]
    assert there[0]["human"] == f"llm:{server}#{MODEL}"


@pytest.mark.integration
def test_a_server_that_takes_no_token_ids_is_refused_before_any_work_naming_why(llama_server):
    """llama-cpp-python's server takes string prompts only (and sends no token ids back)."""
    with pytest.raises(
        ServerEngineError, match=r"#smollm2 does not take a token-id prompt \(HTTP 500.*use vLLM"
    ):
        build_assistant(AssistantConfig(assistant=models.DEFAULT_MODEL, assistant_url=llama_server))


def _adapter_folder(folder):
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": MODEL, "r": 8}))
    return folder


def test_an_adapter_on_a_server_must_be_named_or_its_base_could_answer(server, tmp_path):
    """The server lists one model, which may be the base: an adapter's run names what serves it."""
    adapter = _adapter_folder(tmp_path / "empower-eta2")
    with pytest.raises(ValueError, match=r"empower-eta2 is a LoRA adapter: name the model the server at"):
        build_assistant(AssistantConfig(assistant=str(adapter), assistant_url=server))


def test_serve_in_front_of_a_server_that_lacks_the_adapter_is_refused(server, tmp_path):
    from empower.serve.server import ServeConfig
    from empower.serve.upstream import start_vllm_engine

    adapter = _adapter_folder(tmp_path / "empower-eta2")
    config = ServeConfig(assistant=str(adapter), serve_engine_url=server)
    with pytest.raises(
        ValueError, match=r"must serve by the name 'empower-eta2'.*it serves \['tiny-random'\]"
    ):
        start_vllm_engine(config, models.load_tokenizer(MODEL))


def test_a_name_the_server_does_not_serve_is_refused_with_the_names_it_does(server):
    with pytest.raises(
        ValueError, match=rf"does not serve a model named 'adapter-7'; it serves \['{MODEL}'\]"
    ):
        served_model(server, "adapter-7")
    assert served_model(f"{server}/v1") == MODEL


def test_an_unreachable_server_is_one_error_naming_its_url(tiny_model_path):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerEngineError, match=url):
        build_assistant(AssistantConfig(assistant=tiny_model_path, assistant_url=url))


def test_prompt_logprobs_score_what_the_in_process_engine_scores(server, tiny):
    tokenizer = tiny[1]
    rows = [ScoreRequest(p[:2], p[2:]) for p in encode(tokenizer, STATES)]
    remote = server_engine(server, served_model(server), tokenizer).score(rows)
    for here, there in zip(LocalEngine(*tiny).score(rows), remote, strict=True):
        assert there == pytest.approx(here, abs=1e-4) and len(there) > 0


def test_a_data_build_through_the_estimator_url_gives_the_in_process_pairs(server, tiny_model_path, tmp_path):
    """Corpus scoring through prompt_logprobs: the same k* (the tiny model's NLLs agree to ~1e-6 bits)."""

    def pairs(**where):
        config = DataConfig(out=tmp_path / ("url" if where else "local"), estimator=tiny_model_path, eta=40.0,
                            corpus_limit=6, cuts_per_doc=3, scoring_max_tokens=256, scoring_overlap=32,
                            progress=False, **where)  # fmt: skip
        rows = [json.loads(line) for line in (build_data(config) / "pairs.jsonl").read_text().splitlines()]
        return sorted((r["doc_id"], r["prompt"], r["completion"]) for r in rows), [
            r["cum_bits"] for r in rows
        ]

    (here, here_bits), (there, there_bits) = pairs(), pairs(estimator_url=server)
    assert there == here and any(completion for _, _, completion in here)
    assert sorted(there_bits) == pytest.approx(sorted(here_bits), abs=1e-3)


def test_empower_serve_in_front_of_any_server_suggests_what_it_does_in_process(
    server, tiny, tiny_model_path, tmp_path
):
    """`empower serve --engine-url` (no --engine vllm) over another server: threshold applied in front."""
    args = [
        "--assistant",
        MODEL,
        "--engine-url",
        server,
        "--policy",
        "threshold",
        "--eta",
        "40",
        "--model-name",
        "front",
    ]
    fields = dict(assistant=tiny_model_path, policy=Policy.THRESHOLD, eta=40.0, max_new_tokens=12)
    expected = PolicyAssistant(AssistantConfig(**fields), LocalEngine(*tiny)).suggest(
        [SuggestionRequest(state) for state in STATES]
    )
    with serve_process(args, tmp_path / "front.log") as front:
        for state, suggestion in zip(STATES, expected, strict=True):
            body = {"model": "front", "prompt": state, "max_tokens": 12, "temperature": 0}
            answer = httpx.post(f"{front}/v1/completions", json=body, timeout=60).json()
            assert answer["choices"][0]["text"] == suggestion.text
    assert any(s.stop_reason == "threshold" for s in expected)
