"""`empower data build` / `empower data stats` end to end, and one clear error per bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from empower.cli import main

CODE = (Path(__file__).parent / "test_scoring.py").read_text().split("CODE = '''")[1].split("'''")[0]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": CODE + f"# {i}\n"}) + "\n" for i in range(3)))
    return path


def _empower(*args):
    """The installed command in a real subprocess (as a user runs it)."""
    command = [str(Path(sys.executable).parent / "empower"), *map(str, args)]
    return subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )


def _run_main(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, args)])
    return exit_info.value.code, capsys.readouterr().err


def test_build_then_stats(tmp_path, corpus):
    out = tmp_path / "data"
    build = _empower(
        "data",
        "build",
        "--corpus",
        corpus,
        "--estimator",
        "tiny-random",
        "--method",
        "sft",
        "--n",
        5,
        "--cuts-per-doc",
        2,
        "--out",
        out,
        "--no-progress",
    )
    assert build.returncode == 0, build.stderr
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["method"] for r in rows} == {"sft-5"}
    stats = _empower("data", "stats", out)
    assert stats.returncode == 0, stats.stderr
    assert "sft-5: 6" in stats.stdout and "completion length" in stats.stdout
    assert (out / "completion_lengths.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_corpus_is_named(capsys, tmp_path):
    code, err = _run_main(
        capsys,
        "data",
        "build",
        "--corpus",
        tmp_path / "absent.jsonl",
        "--out",
        tmp_path / "o",
        "--estimator",
        "tiny-random",
    )
    assert code == 2 and "absent.jsonl" in err
    assert not (tmp_path / "o").exists()


def test_non_positive_eta_is_named(capsys, tmp_path, corpus):
    code, err = _run_main(capsys, "data", "build", "--corpus", corpus, "--out", tmp_path / "o", "--eta", "0")
    assert code == 2 and "eta" in err
    assert not (tmp_path / "o").exists()


def test_unknown_model_is_named(capsys, tmp_path, corpus):
    code, err = _run_main(
        capsys, "data", "build", "--corpus", corpus, "--out", tmp_path / "o", "--estimator", "no-such-model"
    )
    assert code == 2 and "no-such-model" in err
    assert not (tmp_path / "o").exists()


def test_bad_jsonl_line_is_named_and_the_build_is_marked_incomplete(capsys, tmp_path, corpus):
    corpus.write_text(corpus.read_text() + '{"code": "x"}\n')
    code, err = _run_main(
        capsys,
        "data",
        "build",
        "--corpus",
        corpus,
        "--out",
        tmp_path / "o",
        "--estimator",
        "tiny-random",
        "--no-progress",
    )
    assert code == 2 and "corpus.jsonl:4" in err and "'text'" in err
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["complete"] is False


def test_stats_of_a_folder_that_is_not_data(capsys, tmp_path):
    code, err = _run_main(capsys, "data", "stats", tmp_path)
    assert code == 2 and "no pairs.jsonl" in err


def test_sft_rand_flags_reach_the_config(capsys, tmp_path, corpus):
    code, err = _run_main(
        capsys,
        "data",
        "build",
        "--corpus",
        corpus,
        "--out",
        tmp_path / "o",
        "--method",
        "sft-rand",
        "--min",
        "5",
        "--max",
        "2",
    )
    assert code == 2 and "sft_rand_min=5" in err


def _build(capsys, corpus, out, *flags) -> tuple[int, str]:
    """``empower data build`` of ``corpus`` with the tiny model: (exit code, stderr unwrapped)."""
    args = ["data", "build", "--corpus", corpus, "--out", out, "--estimator", "tiny-random", "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, args), *flags])
    return exit_info.value.code, " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("flag", [[], ["--overwrite"], ["--resume"]])
def test_a_folder_that_is_not_a_build_is_refused_untouched(capsys, tmp_path, corpus, flag):
    """A model folder has a config.json too: --overwrite must not delete it, --resume not reuse it."""
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8}))
    (out / "model.safetensors").write_bytes(b"weights")
    code, err = _build(capsys, corpus, out, *flag)
    assert code == 2 and f"{out} is not empty and holds no empower data build" in err
    assert f"looked for {out / 'config.json'}" in err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_an_existing_build_is_named_and_overwritten_only_when_asked(capsys, tmp_path, corpus):
    out = tmp_path / "data"
    assert _build(capsys, corpus, out, "--method", "sft")[0] == 0
    code, err = _build(capsys, corpus, out)
    assert code == 2 and f"{out} already holds a data build; pass --resume" in err
    code, err = _build(capsys, corpus, out, "--resume")
    assert code == 2 and f"--resume of {out} with different settings (method: 'sft' -> 'empower')" in err
    assert _build(capsys, corpus, out, "--overwrite")[0] == 0
    assert json.loads((out / "manifest.json").read_text())["method"] == "empower"


def test_zero_scoring_overlap_is_named(capsys, tmp_path, corpus):
    code, err = _build(capsys, corpus, tmp_path / "o", "--scoring-overlap", "0")
    assert code == 2 and "scoring_overlap=0 is invalid" in err
    assert not (tmp_path / "o").exists()
