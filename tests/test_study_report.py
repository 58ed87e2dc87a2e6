"""The study report: buffer replay, per-arm metrics, preferences and tests on a known study."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from sqlalchemy import select

from empower.serve.study.report import (
    _E,
    StudyReportConfig,
    build_study_report,
    replay,
    two_proportion_z,
    write_study_report,
)
from empower.serve.study.store import (
    Participant,
    StudyCreateConfig,
    Suggestion,
    SurveyAnswer,
    create_study,
    event_row,
    insert_events,
    open_store,
)
from study_server import write_tasks

# ------------------------------------------------------------------------------ replay


def test_replay_counts_only_deleted_characters_that_came_from_a_suggestion():
    events = [
        _E("insert", 2, "xy"),  # ab|xy
        _E("suggestion_accepted", 4, "SUGG", sid=1),  # abxySUGG
        _E("delete", 3, deleted="ySU"),  # 1 typed + 2 suggested characters
    ]
    result = replay("ab", events)
    assert result.text == "abxGG" and result.deleted_from == {1: 2}


def test_text_typed_inside_a_suggestion_is_not_counted_as_suggested():
    events = [
        _E("suggestion_accepted", 0, "abcd", sid=3),
        _E("insert", 2, "ZZ"),
        _E("delete", 1, deleted="bZZc"),
    ]
    assert replay("", events).deleted_from == {3: 2}


def test_replay_refuses_a_delete_that_does_not_match_the_buffer():
    with pytest.raises(ValueError, match="deleting 'q' at 0"):
        replay("abc", [_E("delete", 0, deleted="q")])


def test_two_proportion_z_matches_the_textbook_value():
    z, p = two_proportion_z([8, 6], [100, 100])
    assert z == pytest.approx(0.5543, abs=1e-4) and p == pytest.approx(0.5794, abs=1e-3)
    assert two_proportion_z([1, 0], [0, 5]) == (None, None)


# ------------------------------------------------------------------------------ a known study


def _study(tmp_path):
    db = str(tmp_path / "study.sqlite")
    config = StudyCreateConfig(
        assistants=["A=tiny-random:model", "B=tiny-random:base-n:4"],
        db=db,
        tasks_path=str(write_tasks(tmp_path)),
        participants=2,
        name="known",
    )
    store = open_store(db)
    study = create_study(store, config)
    return db, store, study


def _play(store, session, script: list[tuple], client_deleted_bias: int = 0) -> None:
    """Write one session's events: ("show", text, accept?) or ("delete_suggested", n) against its prompt."""
    rows, code = [], session_prompt(store, session)
    origin = [None] * len(code)
    with store.begin() as db:
        for step in script:
            if step[0] == "show":
                _, text, accept = step
                sid = _suggest(db, session, text)
                rows.append(dict(kind="suggestion_shown", suggestion_id=sid, position=len(code)))
                if accept:
                    rows.append(
                        dict(kind="suggestion_accepted", suggestion_id=sid, position=len(code), text=text)
                    )
                    origin += [sid] * len(text)
                    code += text
                else:
                    rows.append(dict(kind="suggestion_rejected", suggestion_id=sid))
            else:
                _, n = step
                gone = code[-n:]
                suggested = sum(o is not None for o in origin[-n:])
                rows.append(
                    dict(
                        kind="delete",
                        position=len(code) - n,
                        deleted_text=gone,
                        deleted_from_suggestion=suggested + client_deleted_bias,
                    )
                )
                code, origin = code[:-n], origin[:-n]
        insert_events(
            db,
            [
                event_row(
                    session.id, {"client_id": f"s{session.id}-{i:04d}", "seq": i, "client_ms": 1, **row}
                )
                for i, row in enumerate(rows, start=1)
            ],
        )
        stored = db.get(type(session), session.id)
        stored.final_code, stored.passed = code, step_passed(script)
        stored.finished_at = datetime.now(timezone.utc)


def session_prompt(store, session) -> str:
    from empower.serve.study.store import Study

    with store() as db:
        study = db.scalars(select(Study)).one()
        return study.tasks[session.task_index]["prompt"]


def step_passed(script) -> bool:
    return any(step[0] == "show" and step[2] for step in script)


def _suggest(db, session, text: str) -> int:
    row = Suggestion(
        session_id=session.id,
        assistant_id=session.assistant_id,
        state_chars=0,
        text=text,
        tokens=len(text),
        stop_reason="eos",
        latency_ms=1.0,
    )
    db.add(row)
    db.flush()
    return row.id


def _sessions_by_label(store):
    with store() as db:
        participants = db.scalars(select(Participant).order_by(Participant.index)).all()
        return [{s.assistant.label: s for s in p.sessions} for p in participants], participants


@pytest.fixture
def known(tmp_path):
    """Arm A: 4 shown (1 accepted, 3 of its 5 characters deleted); arm B: 2 shown, both accepted, 0 deleted."""
    db, store, _ = _study(tmp_path)
    by_label, participants = _sessions_by_label(store)
    _play(store, by_label[0]["A"], [("show", "abcde", True), ("show", "zz", False), ("delete_suggested", 3)])
    _play(store, by_label[1]["A"], [("show", "q", False), ("show", "r", False)])
    _play(store, by_label[0]["B"], [("show", "0123456789", True)])
    _play(store, by_label[1]["B"], [("show", "01234567", True)])
    with store.begin() as s:
        for p in participants:
            arm = by_label[p.index]["A"]
            for question in ("enjoy", "relevant"):
                s.add(
                    SurveyAnswer(
                        participant_id=p.id,
                        question=question,
                        position=arm.position,
                        assistant_id=arm.assistant_id,
                    )
                )
            s.get(Participant, p.id).finished_at = datetime.now(timezone.utc)
    return db


def _arm(report, label):
    return next(a for a in report.arms if a.label == label)


def test_acceptance_and_counts_per_arm(known):
    report = build_study_report(known)
    a, b = _arm(report, "A"), _arm(report, "B")
    assert (a.shown, a.accepted, a.acceptance_rate) == (4, 1, 0.25)
    assert (b.shown, b.accepted, b.acceptance_rate) == (2, 2, 1.0)
    assert a.shown_per_participant == 2.0 and b.shown_per_participant == 1.0


def test_suggestion_length_and_deleted_characters(known):
    report = build_study_report(known)
    a, b = _arm(report, "A"), _arm(report, "B")
    assert a.mean_suggestion_chars == pytest.approx((5 + 2 + 1 + 1) / 4)
    assert b.mean_suggestion_chars == 9.0
    assert (a.chars_deleted_from_accepted, a.chars_deleted_per_accepted) == (3, 3.0)
    assert (b.chars_deleted_from_accepted, b.chars_deleted_per_accepted) == (0, 0.0)
    assert (a.task_success, b.task_success) == (0.5, 1.0)
    assert report.replay_mismatches == []


def test_preferences_and_tests(known):
    report = build_study_report(known)
    enjoy = next(p for p in report.preferences if p.question == "enjoy")
    assert enjoy.counts == {"A": 2, "B": 0} and enjoy.share["A"] == 1.0
    assert enjoy.p_value["A"] == pytest.approx(0.5)  # 2 of 2 is no evidence
    acceptance = next(t for t in report.tests if t.metric == "acceptance_rate")
    assert acceptance.test == "two_proportion_z" and acceptance.n == [4, 2]
    assert acceptance.p_value == pytest.approx(two_proportion_z([1, 2], [4, 2])[1])
    tests = {(t.metric, t.test) for t in report.tests}
    assert ("suggestion_chars", "welch_t") in tests and ("suggestion_chars", "mann_whitney_u") in tests


def test_disagreeing_client_count_is_flagged(tmp_path):
    db, store, _ = _study(tmp_path)
    by_label, _ = _sessions_by_label(store)
    _play(store, by_label[0]["A"], [("show", "abc", True), ("delete_suggested", 2)], client_deleted_bias=1)
    assert build_study_report(db).replay_mismatches == [by_label[0]["A"].id]


def test_report_files_are_written(known, tmp_path):
    report = write_study_report(StudyReportConfig(db=known, out=tmp_path / "out"))
    saved = json.loads((tmp_path / "out" / "study_report.json").read_text())
    assert saved["arms"][0]["acceptance_rate"] == report.arms[0].acceptance_rate
    markdown = (tmp_path / "out" / "study_report.md").read_text()
    assert "| A | `tiny-random:model` | 2 | 4 | 1 | 0.250 |" in markdown


def test_missing_database_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.sqlite"):
        build_study_report(str(tmp_path / "nothing.sqlite"))
