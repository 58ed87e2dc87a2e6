"""The episode loop end to end: the real tiny-model assistant, the real reference human, the real sandbox.

Tasks are a hand-written HumanEval-format file read by the real loader (the user path).
"""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from empower import models
from empower.assistant import AssistantConfig, Suggestion, build_assistant
from empower.env import Episode, EvalConfig, LoopStatus, TokenCounter, run_episodes, run_eval
from empower.humans import ChatReply, HumanConfig, LLMHuman, build_human
from empower.metrics import summarize_run
from empower.reproduce import eval_done
from empower.tasks import Task, TestType, load_tasks

PROBLEMS = {
    "add": (
        'def add(a, b):\n    """Sum of a and b."""\n',
        "    return a + b\n",
        "assert candidate(1, 2) == 3",
    ),
    "double": (
        'def double(x):\n    """Twice x."""\n',
        "    y = x * 2\n    return y\n",
        "assert candidate(4) == 8",
    ),
    "greet": (
        'def greet(name):\n    """Hello, name!"""\n',
        "    return 'Hello, ' + name + '!'\n",
        "assert candidate('Bo') == 'Hello, Bo!'",
    ),
}


def _write_tasks(path: Path, copies: int = 1, broken: tuple[str, ...] = ()) -> Path:
    rows = []
    for i in range(copies):
        for name, (prompt, solution, check) in PROBLEMS.items():
            rows.append(
                {
                    "task_id": f"toy/{name}{i or ''}",
                    "prompt": prompt,
                    "entry_point": name,
                    "canonical_solution": "    return None\n" if name in broken else solution,
                    "test": f"def check(candidate):\n    {check}\n",
                }
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tasks_file(tmp_path_factory):
    return _write_tasks(tmp_path_factory.mktemp("tasks") / "toy.jsonl")


@pytest.fixture(scope="module")
def make_config(tmp_path_factory, tiny_model_path, tasks_file):
    def make(**overrides):
        values = dict(
            assistant=tiny_model_path,
            policy="model",
            max_new_tokens=6,
            human="reference",
            tasks="humaneval",
            tasks_path=str(tasks_file),
            out=tmp_path_factory.mktemp("eval") / "run",
            sim_batch_size=4,
            sandbox_workers=2,
            metrics_resamples=200,
        )
        return EvalConfig(**{**values, **overrides})

    return make


@pytest.fixture(scope="module")
def finished_run(make_config):
    """One complete run shared by the tests that only read it (runs cost seconds even with the tiny model)."""
    config = make_config()
    return run_eval(config, progress=False), config


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A private copy of the finished run, for tests that interrupt or resume it."""
    run, config = finished_run
    copy = shutil.copytree(run, tmp_path / "run")
    return copy, dataclasses.replace(config, out=copy, resume=True)


def _traces(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "traces.jsonl").read_text().splitlines()]


def test_run_folder_holds_config_traces_and_summary(finished_run):
    run, _ = finished_run
    assert {p.name for p in run.iterdir()} >= {"config.json", "traces.jsonl", "summary.json"}


def test_config_records_the_tokenizer_that_counted(finished_run):
    run, config = finished_run
    assert (
        json.loads((run / "config.json").read_text())["count_tokenizer"]
        == config.count_tokenizer
        == config.assistant
    )


def test_the_count_tokenizer_is_the_assistants_unless_named(tmp_path):
    """A trained folder counts with its base model's tokenizer, so every method of one base counts alike."""
    folder = tmp_path / "sft-20"
    folder.mkdir()
    (folder / "empower-model.json").write_text(json.dumps({"base_model": "smollm2-135m"}))
    assert EvalConfig(assistant=str(folder)).count_tokenizer == "smollm2-135m"
    assert EvalConfig(assistant="qwen2.5-coder-0.5b").count_tokenizer == "qwen2.5-coder-0.5b"
    named = EvalConfig(assistant=str(folder), sim_count_tokenizer="qwen2.5-coder-0.5b")
    assert named.count_tokenizer == "qwen2.5-coder-0.5b"


def test_the_human_caps_what_it_writes_with_the_runs_count_tokenizer(make_config):
    """K_H and tokens written are one count: with another tokenizer than SmolLM2's (Qwen's), no chunk
    the human writes is longer than K_H in the tokenizer the run counts with."""
    config = make_config(sim_count_tokenizer=models.HUMAN_MODEL, human_max_tokens=2, sim_max_rounds=60)
    run = run_eval(config, progress=False)
    wrote = [e["tokens"] for t in _traces(run) for e in t["events"] if e["kind"] == "wrote"]
    assert wrote and max(wrote) == 2
    assert json.loads((run / "config.json").read_text())["count_tokenizer"] == models.HUMAN_MODEL


def test_one_trace_per_task(finished_run):
    run, _ = finished_run
    assert sorted(t["task_id"] for t in _traces(run)) == ["toy/add", "toy/double", "toy/greet"]


def test_reference_human_completes_every_task_despite_a_random_assistant(finished_run):
    run, _ = finished_run
    assert [t["passed"] for t in _traces(run)] == [True, True, True]
    assert summarize_run(run).pass_at_1.value == 1.0


def test_program_is_the_prompt_plus_the_appended_text(finished_run):
    run, _ = finished_run
    for trace in _traces(run):
        appended = "".join(e["text"] for e in trace["events"] if e["kind"] in ("accepted", "wrote"))
        assert trace["program"] == PROBLEMS[trace["task_id"].split("/")[1]][0] + appended


def test_tokens_read_are_the_shown_suggestions_counted_by_the_fixed_tokenizer(finished_run):
    run, config = finished_run
    count = TokenCounter(config.count_tokenizer)
    for trace in _traces(run):
        shown = [e for e in trace["events"] if e["kind"] == "suggested"]
        assert trace["tokens_read"] == sum(count([e["text"] for e in shown]))
        assert trace["suggestion_tokens"] == [e["tokens"] for e in shown]


def test_tokens_written_are_the_humans_text(finished_run):
    run, config = finished_run
    count = TokenCounter(config.count_tokenizer)
    for trace in _traces(run):
        wrote = [e["text"] for e in trace["events"] if e["kind"] == "wrote"]
        assert trace["tokens_written"] == sum(count(wrote)) > 0


def test_existing_run_is_not_overwritten_without_resume(run_copy):
    _, config = run_copy
    with pytest.raises(ValueError, match="--resume"):
        run_eval(dataclasses.replace(config, resume=False), progress=False)


def test_resume_runs_only_the_missing_episodes(run_copy):
    run, config = run_copy
    lines = (run / "traces.jsonl").read_text().splitlines(keepends=True)
    (run / "traces.jsonl").write_text("".join(lines[:2]))
    run_eval(config, progress=False)
    traces = _traces(run)
    assert [json.dumps(t) + "\n" for t in traces[:2]] == lines[:2] and len(traces) == 3
    assert traces[2]["task_id"] == json.loads(lines[2])["task_id"]


def test_resume_refuses_a_different_configuration(run_copy):
    _, config = run_copy
    with pytest.raises(ValueError, match="max_new_tokens"):
        run_eval(dataclasses.replace(config, max_new_tokens=7), progress=False)


def test_a_run_made_before_a_setting_existed_resumes_only_at_its_default(run_copy):
    """config.json of an older run lacks human_repair: it resumes at the default (no repair), and a
    resume asking for repairs is refused, naming the setting."""
    run, config = run_copy
    saved = json.loads((run / "config.json").read_text())
    del saved["human_repair"]
    (run / "config.json").write_text(json.dumps(saved))
    lines = (run / "traces.jsonl").read_text().splitlines(keepends=True)
    (run / "traces.jsonl").write_text("".join(lines[:2]))
    with pytest.raises(ValueError, match="human_repair: 0.0 -> 0.5"):
        run_eval(dataclasses.replace(config, human_repair=0.5), progress=False)
    run_eval(config, progress=False)
    assert len(_traces(run)) == 3


def test_a_resume_compares_the_tokenizer_that_counted_not_how_it_was_named(run_copy):
    """A run that named its assistant's tokenizer resumes with the default (the same one); a resume that
    would count with another tokenizer is refused."""
    run, config = run_copy
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "sim_count_tokenizer": config.assistant}))
    lines = (run / "traces.jsonl").read_text().splitlines(keepends=True)
    (run / "traces.jsonl").write_text("".join(lines[:2]))
    with pytest.raises(ValueError, match="sim_count_tokenizer: .* -> 'qwen2.5-coder-0.5b'"):
        run_eval(dataclasses.replace(config, sim_count_tokenizer="qwen2.5-coder-0.5b"), progress=False)
    run_eval(config, progress=False)
    assert len(_traces(run)) == 3


def test_torn_trace_line_is_played_again_on_resume(run_copy):
    run, config = run_copy
    lines = (run / "traces.jsonl").read_text().splitlines(keepends=True)
    (run / "traces.jsonl").write_text("".join(lines[:2]) + lines[2][:40])
    run_eval(config, progress=False)
    assert sorted(t["task_id"] for t in _traces(run)) == ["toy/add", "toy/double", "toy/greet"]


def test_task_whose_reference_fails_is_excluded_and_counted(tmp_path, make_config):
    broken = _write_tasks(tmp_path / "broken.jsonl", broken=("double",))
    run = run_eval(make_config(tasks_path=str(broken)), progress=False)
    saved = json.loads((run / "config.json").read_text())
    assert [e["task_id"] for e in saved["excluded_tasks"]] == ["toy/double"]
    assert "toy/double" not in {t["task_id"] for t in _traces(run)}
    assert summarize_run(run).excluded == 1


@pytest.mark.parametrize(
    "field,value",
    [("sim_max_rounds", 0), ("sim_batch_size", 0), ("limit", 0), ("assistant_batch_size", 0),
     ("human_concurrency", 0), ("human_batch_size", 0), ("human_repair", 1.5)],
)  # fmt: skip
def test_an_invalid_setting_is_refused_by_name(make_config, field, value):
    with pytest.raises(ValueError, match=field):
        make_config(**{field: value})


def test_default_run_folder_names_assistant_policy_human_and_tasks():
    config = EvalConfig(assistant="smollm2-135m", policy="base-n", n=10, human="reference", tasks="mbpp")
    assert config.out == Path("runs/eval/smollm2-135m-base-10-reference-mbpp")


@pytest.fixture(scope="module")
def players(make_config, tiny, tasks_file):
    config = make_config()
    assistant = build_assistant(config.part(AssistantConfig), model=tiny[0], tokenizer=tiny[1])
    human = build_human(config.part(HumanConfig))
    count = TokenCounter(config.count_tokenizer)

    def play(on_finished=None, status=None, **overrides):
        traces = []

        def finished(trace):
            traces.append(trace)
            if on_finished:
                on_finished(trace)

        stats = run_episodes(
            load_tasks("humaneval", str(tasks_file)),
            assistant,
            human,
            dataclasses.replace(config, **overrides),
            count,
            finished,
            status,
        )
        return stats, traces

    return play


def test_round_limit_cuts_episodes(players):
    _, traces = players(sim_max_rounds=1)
    assert {(t["turns"], t["end_reason"]) for t in traces} == {(1, "max_rounds")}


def test_length_cap_cuts_episodes(players):
    _, traces = players(sim_max_tokens=1)
    assert {t["end_reason"] for t in traces} == {"max_tokens"}


def test_live_episodes_are_stepped_together(players):
    stats, traces = players()
    assert stats.steps == max(t["turns"] for t in traces)


def test_one_by_one_takes_a_step_per_turn(players):
    stats, traces = players(sim_batch_size=1)
    assert stats.steps == sum(t["turns"] for t in traces)


def _by_task(traces: list[dict]) -> list[dict]:
    return sorted(traces, key=lambda t: t["task_id"])


def test_the_async_loop_plays_the_lockstep_episodes_each_advancing_on_its_own(players):
    _, lockstep = players()
    stats, async_ = players(sim_loop="async", sim_batch_size=3)
    assert _by_task(async_) == _by_task(lockstep) and stats.episodes == len(lockstep)
    assert stats.steps == sum(t["turns"] for t in lockstep)  # a step per episode turn
    shared = stats.engines["assistant"]
    assert shared.rows == stats.steps and shared.batches < shared.rows  # turns of episodes in one call
    _, again = players()  # the run's engines are the players' own again
    assert _by_task(again) == _by_task(lockstep)


@pytest.mark.parametrize("loop", ["lockstep", "async"])
def test_progress_shows_live_episodes_and_the_rate(players, loop):
    status, seen = LoopStatus(), []
    _, traces = players(on_finished=lambda trace: seen.append((status.live, status.line())), status=status,
                        sim_loop=loop, sim_batch_size=3)  # fmt: skip
    assert status.finished == len(traces) == 3 and status.live == 0
    assert seen[0][0] >= 1 and seen[0][1].startswith(f"{seen[0][0]} live, ")
    assert status.line().startswith("0 live, 0 waiting on a call, ") and status.line().endswith(
        " episodes/min"
    )


def test_the_async_loop_plays_the_lockstep_episodes_with_the_llm_human(
    make_config, tiny, tiny_model_path, tasks_file
):
    config = make_config(human="llm", human_model=tiny_model_path, human_max_tokens=3,
                         human_max_new_tokens=6, sim_max_rounds=3)  # fmt: skip
    assistant = build_assistant(config.part(AssistantConfig), model=tiny[0], tokenizer=tiny[1])
    human = build_human(config.part(HumanConfig), model=tiny[0], tokenizer=tiny[1])
    count, tasks = TokenCounter(config.count_tokenizer), load_tasks("humaneval", str(tasks_file))
    runs = {}
    for loop in ("lockstep", "async"):
        runs[loop] = []
        run_episodes(
            tasks, assistant, human, dataclasses.replace(config, sim_loop=loop), count, runs[loop].append
        )
    assert _by_task(runs["async"]) == _by_task(runs["lockstep"])
    assert all(t["human_answers"] for t in runs["async"])
    # The tiny model's answers are malformed, and an LLM human never deletes: no flag is taken for another.
    assert sum(t["malformed_human_answers"] for t in runs["async"]) > 0
    assert not any(e["kind"] == "deleted" for t in runs["async"] for e in t["events"])


@pytest.mark.parametrize("loop, after", [("lockstep", 1), ("async", 1), ("async", 3)])
def test_killed_run_resumes_without_counting_an_episode_twice(tmp_path, tiny_model_path, loop, after):
    """SIGKILL once ``after`` episodes are saved (others in flight); --resume then plays what is
    missing, and the run equals an uninterrupted one."""
    tasks = _write_tasks(tmp_path / "many.jsonl", copies=2)
    out = tmp_path / "run"
    fields = dict(assistant=tiny_model_path, policy="model", max_new_tokens=6, tasks="humaneval",
                  tasks_path=str(tasks), sim_batch_size=1 if loop == "lockstep" else 3, sim_loop=loop,
                  sandbox_workers=1, metrics_resamples=200)  # fmt: skip
    command = [sys.executable, "-m", "empower", "eval"]
    command += [f"--{k.replace('_', '-')}={v}" for k, v in fields.items()] + ["--out", str(out)]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    traces = out / "traces.jsonl"
    while process.poll() is None and not (traces.is_file() and traces.read_text().count("\n") >= after):
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_before = traces.read_text().count("\n")
    assert 1 <= done_before < 6, "the run must be interrupted mid-way for this test to mean anything"
    assert not (out / "summary.json").exists()
    run_eval(EvalConfig(**fields, out=out, resume=True), progress=False)
    ids = [t["task_id"] for t in _traces(out)]
    assert len(ids) == len(set(ids)) == 6
    whole = run_eval(EvalConfig(**fields, out=tmp_path / "whole"), progress=False)
    assert _by_task(_traces(out)) == _by_task(_traces(whole))


# ---------------------------------------------------------------- scripted episodes, counted by hand


class ScriptedAssistant:
    """Suggests fixed texts, one per turn (then nothing): the loop's bookkeeping without a model."""

    name = "scripted"

    def __init__(self, suggestions: list[str]):
        self.suggestions = list(suggestions)

    def suggest(self, requests):
        return [Suggestion(self.suggestions.pop(0) if self.suggestions else "", 0, "eos") for _ in requests]


def _play_add(make_config, suggestions, human=None, **overrides):
    """One episode of toy/add ("    return a + b\n" intended) with the reference human writing K_H=4 tokens."""
    config = make_config(**{"human_max_tokens": 4, "sim_batch_size": 1, **overrides})
    tasks = [t for t in load_tasks("humaneval", config.tasks_path) if t.task_id == "toy/add"]
    traces = []
    run_episodes(
        tasks,
        ScriptedAssistant(suggestions),
        human or build_human(config.part(HumanConfig)),
        config,
        TokenCounter(config.count_tokenizer),
        traces.append,
    )
    [trace] = traces
    return trace


# The counting tokenizer (SmolLM2) splits "    return a + b\n" into "   ", " return", " a", " +", " b", "\n":
# 6 tokens; "    return a" is 3, " + b\n" 3, "    return a +" 4 (the human's K_H=4 chunk), " b\n" and " c\n" 2,
# "    print(a)\n" 6 ("   ", " print", "(", "a", ")", "\n"). DPR = 0.999 ** (0.1 * read + 0.5 * written) when
# the program passes, else 0. Each case: suggestions, config overrides, tokens read, tokens written, DPR,
# event kinds, suggestions shown, accepted, end reason, passed.
SCRIPTS = {
    # turn 1: "    return a" agrees with the intent: accepted (read 3); the human writes the rest " + b\n"
    # (written 3). Turn 2: nothing left to write: finish. DPR = 0.999 ** (0.3 + 1.5) = 0.999 ** 1.8.
    "accept": (
        ["    return a"],
        {},
        3,
        3,
        0.99820072,
        ["suggested", "accepted", "wrote", "finished"],
        1,
        1,
        "finish",
        True,
    ),
    # turn 1: "    return a - b\n" rejected (read 6), the human writes "    return a +" (written 4); turn 2:
    # " c\n" rejected (read 2), the human writes " b\n" (written 2); turn 3: finish.
    # read 8, written 6: DPR = 0.999 ** (0.8 + 3.0) = 0.999 ** 3.8.
    # K_H=1. Turn 1: "    return" accepted (read 2), the human writes " a" (1); turn 2: " - b\n" rejected
    # (read 3), the human writes " +" (1); turn 3: nothing suggested, the human writes " b" (1); turn 4: only
    # the newline is left: finish. read 5, written 3: DPR = 0.999 ** (0.5 + 1.5) = 0.999 ** 2.
    "accept then reject": (
        ["    return", " - b\n"],
        {"human_max_tokens": 1},
        5,
        3,
        0.998001,
        ["suggested", "accepted", "wrote", "suggested", "rejected", "wrote", "wrote", "finished"],
        2,
        1,
        "finish",
        True,
    ),
    "reject": (
        ["    return a - b\n", " c\n"],
        {},
        8,
        6,
        0.99620532,
        ["suggested", "rejected", "wrote", "suggested", "rejected", "wrote", "finished"],
        2,
        0,
        "finish",
        True,
    ),
    # turns 1-2: nothing suggested, the human writes 4 + 2 tokens; turn 3: "    print(a)\n" is shown (read 6)
    # while the human finishes: read but never appended. DPR = 0.999 ** (0.6 + 3.0) = 0.999 ** 3.6.
    "finish with a pending suggestion": (
        ["", "", "    print(a)\n"],
        {},
        6,
        6,
        0.99640468,
        ["wrote", "wrote", "suggested", "finished"],
        1,
        0,
        "finish",
        True,
    ),
    # an empty suggestion is never shown: nothing read, the human writes all 6 tokens.
    # DPR = 0.999 ** (0 + 3.0) = 0.999 ** 3.
    "empty suggestions": (
        [""] * 3,
        {},
        0,
        6,
        0.99700300,
        ["wrote", "wrote", "finished"],
        0,
        0,
        "finish",
        True,
    ),
    # cut after one turn: the human wrote "    return a +" (4) and the program fails: DPR 0.
    "cut at sim_max_rounds": ([""], {"sim_max_rounds": 1}, 0, 4, 0.0, ["wrote"], 0, 0, "max_rounds", False),
    # cut as soon as the program is 1 counted token long (after the first turn): the same half program.
    "cut at sim_max_tokens": ([""], {"sim_max_tokens": 1}, 0, 4, 0.0, ["wrote"], 0, 0, "max_tokens", False),
}


@pytest.mark.parametrize("case", SCRIPTS)
def test_scripted_episode_counts_tokens_and_dpr(make_config, case):
    suggestions, overrides, read, written, dpr, kinds, shown, accepted, end, passed = SCRIPTS[case]
    trace = _play_add(make_config, suggestions, **overrides)
    assert trace["program"].startswith(PROBLEMS["add"][0] + "    return a") and trace["passed"] is passed
    assert (trace["tokens_read"], trace["tokens_written"]) == (read, written)
    assert trace["dpr"] == pytest.approx(dpr, abs=1e-8)
    assert [e["kind"] for e in trace["events"]] == kinds
    assert (trace["suggestions"], trace["accepted"], trace["end_reason"]) == (shown, accepted, end)
    assert trace["human_answers"] == []  # the reference human has no words of its own


def test_a_repair_deletes_accepted_text_and_the_trace_counts_it(make_config):
    """toy/add: "    return a - b\n" is a near miss (1 edit in 17 characters) the repairing human accepts,
    then deletes from the "-" on (4 characters, all from the accepted suggestion) and writes "+ b\n"."""
    trace = _play_add(make_config, ["    return a - b\n"], human_tolerance=0.1, human_repair=1.0)
    kinds = [e["kind"] for e in trace["events"]]
    assert kinds == ["suggested", "accepted", "deleted", "wrote", "finished"]
    assert [e["text"] for e in trace["events"] if e["kind"] in ("deleted", "wrote")] == ["- b\n", "+ b\n"]
    assert trace["chars_deleted_from_accepted"] == 4 and trace["accepted"] == 1 and trace["passed"]
    kept = _play_add(make_config, ["    return a - b\n"], human_tolerance=0.1)  # no repair: the bug stays
    assert kept["chars_deleted_from_accepted"] == 0 and not kept["passed"]


def test_a_deletion_counts_only_the_characters_that_came_from_accepted_suggestions():
    task = Task("t/0", "Return 1.", "def f():\n", TestType.HUMANEVAL, "def check(f):\n    pass\n", "f")
    episode = Episode(task=task, state=task.prompt + "ab")
    episode.accepted_spans.append((len(episode.state), len(episode.state) + 3))
    episode.state += "cde" + "fg"  # "cde" accepted, then "fg" written
    assert episode.delete(4) == "defg" and episode.chars_deleted == 2
    assert episode.delete(2) == "bc" and episode.chars_deleted == 3
    with pytest.raises(RuntimeError, match="deletes 2 characters"):
        episode.delete(2)


class ScriptedChat:
    """An LLM human's backend answering ACCEPT, and writing the rest of toy/add's reference as the appender
    (after ``pad`` characters of chatter, to test the bound on what a trace keeps)."""

    supports_prefill, label = True, "scripted"

    def __init__(self, pad: str = ""):
        self.pad = pad

    def complete(self, requests):
        full = PROBLEMS["add"][0] + PROBLEMS["add"][1]
        replies = []
        for r in requests:
            if not r.prefill:  # the acceptor
                replies.append(ChatReply(self.pad + "ACCEPT", True))
                continue
            code = r.prefill.removeprefix("```python\n")
            replies.append(ChatReply(r.prefill + full[len(code) :] + "```", True))
        return replies


def test_llm_humans_answers_are_saved_in_the_trace(make_config):
    config = make_config(human="llm", human_max_tokens=4)
    trace = _play_add(make_config, ["    return a"], LLMHuman(config.part(HumanConfig), ScriptedChat()))
    done = "```python\n" + PROBLEMS["add"][0] + PROBLEMS["add"][1] + "```"
    assert trace["human_answers"] == [
        {"turn": 1, "acceptor": "ACCEPT", "appender": done},  # accepted, then wrote " + b\n"
        {"turn": 2, "acceptor": None, "appender": done},  # nothing suggested; nothing to add: finished
    ]
    assert [e["kind"] for e in trace["events"]] == ["suggested", "accepted", "wrote", "finished"]


def test_a_long_human_answer_is_cut_in_the_trace(make_config):
    config = make_config(human="llm", human_max_tokens=4)
    chatter = "Let me think. " * 1000  # 14000 characters
    trace = _play_add(
        make_config, ["    return a"], LLMHuman(config.part(HumanConfig), ScriptedChat(chatter))
    )
    kept = trace["human_answers"][0]["acceptor"]
    assert kept == chatter[:4000] + "... [10006 more characters]"  # 14006 = 14000 + len("ACCEPT")


# ---------------------------------------------------------------- resuming with another limit


def _agree(run: Path) -> bool:
    """reproduce's done-check and the summary say the same about a run."""
    return eval_done(run) == summarize_run(run).complete


def test_resume_with_a_smaller_limit_that_leaves_out_played_episodes_is_refused(run_copy):
    run, config = run_copy
    before = {p.name: p.read_text() for p in run.iterdir()}
    with pytest.raises(
        ValueError, match=r"limit=2: .* outside that set \(toy/greet\); resume with --limit 3"
    ):
        run_eval(dataclasses.replace(config, limit=2), progress=False)
    assert {p.name: p.read_text() for p in run.iterdir()} == before
    assert eval_done(run) and _agree(run)


def test_resume_may_shrink_and_grow_the_limit_around_the_played_episodes(run_copy):
    run, config = run_copy
    lines = (run / "traces.jsonl").read_text().splitlines(keepends=True)
    (run / "traces.jsonl").write_text("".join(line for line in lines if '"toy/add"' in line))
    (run / "summary.json").write_text(json.dumps(summarize_run(run).to_dict()))
    assert not eval_done(run) and _agree(run)
    run_eval(dataclasses.replace(config, limit=2), progress=False)
    assert sorted(t["task_id"] for t in _traces(run)) == ["toy/add", "toy/double"]
    assert eval_done(run) and _agree(run) and summarize_run(run).expected == 2
    run_eval(dataclasses.replace(config, limit=None), progress=False)  # and back to all three
    assert sorted(t["task_id"] for t in _traces(run)) == ["toy/add", "toy/double", "toy/greet"]
    assert eval_done(run) and _agree(run) and summarize_run(run).expected == 3


def test_the_fields_a_resume_may_change_are_declared_on_the_fields():
    """One list per stage, read from option(..., resumable=True) on each config's fields, bases included."""
    from empower.configs import resumable_fields
    from empower.labeling import DataConfig
    from empower.train import TrainConfig

    assert resumable_fields(EvalConfig) == {
        "limit", "out", "resume", "sim_batch_size", "sim_loop", "assistant_batch_size", "assistant_device",
        "assistant_prefix_cache", "human_batch_size", "human_prefix_cache", "human_concurrency",
        "human_timeout_s", "human_retries", "human_device", "sandbox_workers", "metrics_resamples",
        "metrics_seed",
    }  # fmt: skip
    assert resumable_fields(DataConfig) == {
        "scoring_batch_tokens",
        "scoring_cache",
        "device",
        "resume",
        "overwrite",
        "progress",
    }
    assert resumable_fields(TrainConfig) == {
        "resume",
        "overwrite",
        "max_steps",
        "epochs",
        "logging_steps",
        "save_steps",
        "eval_steps",
    }
