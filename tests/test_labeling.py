"""The Empower rule, cut points that round-trip, the baselines, and the data folder (resume included)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_from_disk

from empower.corpus import Document, stdlib_root
from empower.engines.local import LocalEngine
from empower.labeling import (
    DataConfig,
    Method,
    build_data,
    label_document,
    round_trips,
    sample_cuts,
)
from empower.rule import empower_length, empower_lengths
from empower.scoring import empower_length_literal, score_documents

CODE = (Path(__file__).parent / "test_scoring.py").read_text().split("CODE = '''")[1].split("'''")[0]


# ---------------------------------------------------------------- the rule


def test_rule_stops_before_the_token_that_reaches_eta():
    assert empower_length(np.array([0.1, 0.1, 0.5, 0.0]), 0.32) == 2


def test_rule_is_strict_at_eta():
    assert empower_length(np.array([0.32, 0.0]), 0.32) == 0


def test_rule_gives_zero_when_eta_is_below_the_first_token():
    assert empower_length(np.array([1.0, 0.0, 0.0]), 0.32) == 0


def test_rule_runs_to_the_end_when_everything_is_predictable():
    assert empower_length(np.array([0.01, 0.02, 0.03]), 0.32) == 3


def test_vectorised_rule_equals_the_per_cut_rule():
    rng = np.random.default_rng(0)
    nll = rng.exponential(0.4, size=200)
    cuts = np.arange(1, 200)
    expected = [empower_length(nll[n:], 1.5) for n in cuts]
    assert empower_lengths(nll, cuts, 1.5).tolist() == expected


@pytest.mark.parametrize("eta", [0.5, 40.0, 80.0])
def test_one_pass_equals_the_papers_loop_on_real_text(tiny, eta):
    model, tokenizer = tiny
    ids = tokenizer(CODE, add_special_tokens=False).input_ids
    [(_, nll)] = score_documents(LocalEngine(*tiny), [(0, ids)], progress=False)
    cuts = np.arange(1, len(ids), 5)
    one_pass = empower_lengths(nll, cuts, eta).tolist()
    assert one_pass == [empower_length_literal(model, ids, int(n), eta) for n in cuts]
    assert len(set(one_pass)) > 1 or eta == 0.5  # the comparison covers several lengths


@pytest.mark.integration
def test_one_pass_equals_the_papers_loop_with_smollm2(smol):
    model, tokenizer = smol
    text = (stdlib_root() / "textwrap.py").read_text()
    ids = tokenizer(text, add_special_tokens=False).input_ids[:96]
    [(_, nll)] = score_documents(LocalEngine(*smol), [(0, ids)], progress=False)
    cuts = np.linspace(16, 88, 8).astype(int)
    one_pass = empower_lengths(nll, cuts, 4.0).tolist()
    assert one_pass == [empower_length_literal(model, ids, int(n), 4.0) for n in cuts]
    assert max(one_pass) >= 2


# ---------------------------------------------------------------- cuts and pairs


def _scored(tiny, text, doc_id="d"):
    model, tokenizer = tiny
    ids = tokenizer(text, add_special_tokens=False).input_ids
    [(_, nll)] = score_documents(LocalEngine(*tiny), [(0, ids)], progress=False)
    return Document(doc_id, text), ids, nll


def _config(tmp_path, **changes):
    return DataConfig(out=tmp_path / "out", estimator="tiny-random", progress=False, **changes)


def test_a_boundary_inside_a_whitespace_run_does_not_round_trip(tiny):
    _, tokenizer = tiny
    text = "x = 1\n\n\nclass A:\n    pass\n"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    ends = [i for i in range(1, len(ids)) if not round_trips(tokenizer, text, ids, i)]
    assert ends, "this text has a boundary in the middle of '\\n\\n\\n' that re-tokenizes differently"
    assert not set(ends) & set(sample_cuts(tokenizer, Document("d", text), ids, len(ids), seed=0))


def test_every_pair_round_trips_to_the_same_tokens(tiny, tmp_path):
    _, tokenizer = tiny
    doc, ids, nll = _scored(tiny, CODE)
    for method in Method:
        rows = label_document(
            _config(tmp_path, method=method, cuts_per_doc=30, eta=40.0), tokenizer, doc, ids, nll
        )
        assert len(rows) == 30
        for row in rows:
            assert tokenizer(row["prompt"], add_special_tokens=False).input_ids == ids[: row["cut"]]
            whole = row["prompt"] + row["completion"]
            assert tokenizer(whole, add_special_tokens=False).input_ids == ids[: row["cut"] + row["k"]]
            assert CODE.startswith(whole)


def test_methods_share_the_cut_points(tiny, tmp_path):
    _, tokenizer = tiny
    doc, ids, nll = _scored(tiny, CODE)
    cuts = {
        method: [
            r["cut"]
            for r in label_document(
                _config(tmp_path, method=method, cuts_per_doc=5), tokenizer, doc, ids, nll
            )
        ]
        for method in Method
    }
    assert cuts[Method.EMPOWER] == cuts[Method.SFT] == cuts[Method.SFT_RAND]
    other_seed = sample_cuts(tokenizer, doc, ids, 5, seed=1)
    assert other_seed != cuts[Method.EMPOWER]


def test_zero_length_pairs_are_kept_by_default_and_can_be_dropped(tiny, tmp_path):
    _, tokenizer = tiny
    doc, ids, nll = _scored(tiny, CODE)
    kept = label_document(_config(tmp_path, eta=0.01, cuts_per_doc=4), tokenizer, doc, ids, nll)
    assert [r["k"] for r in kept] == [0, 0, 0, 0] and all(r["completion"] == "" for r in kept)
    dropped = label_document(
        _config(tmp_path, eta=0.01, cuts_per_doc=4, keep_zero=False), tokenizer, doc, ids, nll
    )
    assert dropped == []


def test_a_completion_can_reach_the_end_of_the_document(tiny, tmp_path):
    _, tokenizer = tiny
    doc, ids, nll = _scored(tiny, CODE)
    rows = label_document(_config(tmp_path, eta=1e9, cuts_per_doc=3), tokenizer, doc, ids, nll)
    assert all(r["cut"] + r["k"] == len(ids) and r["prompt"] + r["completion"] == CODE for r in rows)


@pytest.mark.parametrize("text", ["", "x"])
def test_empty_and_one_token_documents_give_no_pairs(tiny, tmp_path, text):
    _, tokenizer = tiny
    doc, ids, nll = _scored(tiny, text)
    assert len(ids) <= 1
    assert label_document(_config(tmp_path), tokenizer, doc, ids, nll) == []


def test_baseline_lengths_and_method_names(tiny, tmp_path):
    _, tokenizer = tiny
    doc, ids, nll = _scored(tiny, CODE)
    sft = label_document(
        _config(tmp_path, method=Method.SFT, sft_n=10, cuts_per_doc=8), tokenizer, doc, ids, nll
    )
    assert {r["method"] for r in sft} == {"sft-10"} and {r["eta"] for r in sft} == {None}
    assert all(
        r["k"] == min(10, len(ids) - r["cut"]) or not round_trips(tokenizer, CODE, ids, r["cut"] + 10)
        for r in sft
    )
    rand = label_document(
        _config(tmp_path, method=Method.SFT_RAND, cuts_per_doc=20), tokenizer, doc, ids, nll
    )
    assert {r["method"] for r in rand} == {"sft-rand-1-30"}
    assert all(0 <= r["k"] <= 30 for r in rand) and len({r["k"] for r in rand}) > 3


def test_cum_bits_is_the_sum_of_the_completion_nll(tiny, tmp_path):
    _, tokenizer = tiny
    doc, ids, nll = _scored(tiny, CODE)
    for row in label_document(_config(tmp_path, eta=60.0, cuts_per_doc=5), tokenizer, doc, ids, nll):
        assert row["cum_bits"] == pytest.approx(
            float(nll[row["cut"] : row["cut"] + row["k"]].sum()), rel=1e-5
        )
        assert row["cum_bits"] < 60.0


def test_an_unscored_token_is_an_error_not_zero_bits(tiny, tmp_path):
    """Counted as 0 bits, a NaN would let k* run past it; only position 0 (no context) may be NaN."""
    _, tokenizer = tiny
    doc, ids, nll = _scored(tiny, CODE, doc_id="corpus:0")
    assert np.isnan(nll[0])
    nll[7] = np.nan
    with pytest.raises(ValueError, match=r"corpus:0: no NLL \(NaN\) at token position\(s\) \[7\] of"):
        label_document(_config(tmp_path, cuts_per_doc=5), tokenizer, doc, ids, nll)
    with pytest.raises(ValueError, match=r"position\(s\) \[7\]"):
        empower_lengths(nll, np.array([5]), 40.0)


@pytest.mark.parametrize(
    "field, value",
    [("eta", 0.0), ("eta", -1.0), ("sft_n", 0), ("sft_rand_min", 40), ("scoring_overlap", 0)],
)
def test_bad_values_are_refused_by_name(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        _config(tmp_path, **{field: value})


# ---------------------------------------------------------------- the data folder


def _corpus(tmp_path, texts):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


TEXTS = [CODE, CODE.replace("Counter", "Tally"), CODE.replace("walk", "scan"), CODE[:300] + "\n# end\n"]


def test_build_writes_the_designed_folder(tiny, tmp_path):
    model, tokenizer = tiny
    config = _config(tmp_path, corpus=str(_corpus(tmp_path, TEXTS)), cuts_per_doc=3, eta=40.0)
    out = build_data(config, model=model, tokenizer=tokenizer)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["pairs"] == 12 and manifest["documents"] == 4
    dataset = load_from_disk(str(out / "dataset"))
    assert set(dataset.column_names) == {
        "prompt",
        "completion",
        "doc_id",
        "cut",
        "k",
        "cum_bits",
        "method",
        "eta",
        "estimator",
        "tokenizer",
        "statement",
    }
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert dataset.to_list() == rows
    assert json.loads((out / "config.json").read_text())["eta"] == 40.0


def test_interrupted_build_resumes_without_duplicates(tiny, tmp_path):
    model, tokenizer = tiny
    corpus = _corpus(tmp_path, TEXTS)
    lines = corpus.read_text().splitlines(keepends=True)
    corpus.write_text("".join(lines[:2]) + "{not json\n" + "".join(lines[2:]))
    config = _config(tmp_path, corpus=str(corpus), cuts_per_doc=3)
    with pytest.raises(ValueError, match=r"corpus.jsonl:3: not valid JSON"):
        build_data(config, model=model, tokenizer=tokenizer)
    out = config.out
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    assert not (out / "dataset").exists()
    assert len((out / "documents.jsonl").read_text().splitlines()) == 2  # finished before the bad line
    # An interruption mid-document: pairs of an unfinished document and a torn last line.
    with open(out / "pairs.jsonl", "a") as fh:
        fh.write(json.dumps({"doc_id": "corpus.jsonl:4", "cut": 1}) + "\n" + '{"doc_id": "corp')
    corpus.write_text("".join(lines[:2]) + "\n" + "".join(lines[2:]))  # the bad line fixed (blank)
    with pytest.raises(ValueError, match="already holds"):
        build_data(config, model=model, tokenizer=tokenizer)
    resumed = build_data(DataConfig(**{**vars(config), "resume": True}), model=model, tokenizer=tokenizer)
    rows = [json.loads(line) for line in (resumed / "pairs.jsonl").read_text().splitlines()]
    keys = [(r["doc_id"], r["cut"]) for r in rows]
    assert len(keys) == len(set(keys)) == 12
    fresh = build_data(
        _config(tmp_path / "fresh", corpus=str(corpus), cuts_per_doc=3), model=model, tokenizer=tokenizer
    )
    assert sorted(keys) == sorted(
        (r["doc_id"], r["cut"]) for r in map(json.loads, open(fresh / "pairs.jsonl"))
    )


def test_resume_with_other_settings_is_refused(tiny, tmp_path):
    model, tokenizer = tiny
    config = _config(tmp_path, corpus=str(_corpus(tmp_path, TEXTS[:1])))
    build_data(config, model=model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="eta: 0.32 -> 1.0"):
        build_data(
            DataConfig(**{**vars(config), "resume": True, "eta": 1.0}), model=model, tokenizer=tokenizer
        )


def test_score_cache_misses_after_retraining_the_estimator_at_the_same_path(tiny, tmp_path):
    """The cache is keyed by the estimator's weights: new weights at an old path are scored again."""
    model, tokenizer = tiny
    estimator = tmp_path / "estimator"
    model.save_pretrained(estimator)
    tokenizer.save_pretrained(estimator)
    corpus = str(_corpus(tmp_path, TEXTS[:2]))

    def bits(name: str, cache: bool) -> list[float]:
        config = DataConfig(
            out=tmp_path / name,
            corpus=corpus,
            estimator=str(estimator),
            eta=40.0,
            cuts_per_doc=3,
            scoring_cache=tmp_path / "scores" if cache else None,
            device="cpu",
            progress=False,
        )
        return [json.loads(line)["cum_bits"] for line in open(build_data(config) / "pairs.jsonl")]

    old = bits("old", cache=True)
    retrained = copy.deepcopy(model)
    with torch.no_grad():
        retrained.model.embed_tokens.weight.mul_(1.5)
    retrained.save_pretrained(estimator)
    new = bits("new", cache=True)
    assert new == pytest.approx(bits("fresh", cache=False), abs=1e-4)
    assert new != pytest.approx(old, abs=1e-2)
