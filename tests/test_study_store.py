"""The study store and server: randomisation, no duplicate events, 4xx on bad input, restart safety."""

from __future__ import annotations

import json
import sqlite3

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from empower.serve.study.app import StudyServeConfig, create_app
from empower.serve.study.store import (
    Event,
    StudyCreateConfig,
    add_participants,
    assignment,
    create_study,
    event_row,
    insert_events,
    open_store,
    parse_assistant_spec,
)
from study_server import StudyServer, write_tasks

ARMS = ["A=tiny-random:model", "B=tiny-random:base-n:4"]


@pytest.fixture
def study_db(tmp_path):
    db = str(tmp_path / "study.sqlite")
    config = StudyCreateConfig(
        assistants=ARMS, tasks="humaneval", tasks_path=str(write_tasks(tmp_path)), db=db, participants=2
    )
    create_study(open_store(db), config)
    return db


@pytest.fixture
def client(study_db):
    with TestClient(create_app(StudyServeConfig(db=study_db, max_request_kb=64), load_assistants=False)) as c:
        yield c


def _tokens(db: str) -> list[str]:
    with sqlite3.connect(db) as con:
        return [r[0] for r in con.execute('select token from participants order by "index"')]


def _sessions(db: str, token: str) -> list[int]:
    with sqlite3.connect(db) as con:
        return [
            r[0]
            for r in con.execute(
                "select s.id from sessions s join participants p on p.id = s.participant_id where p.token = ? order by s.id",
                (token,),
            )
        ]


def _event(session_id: int, client_id: str, seq: int, position: int = 0, text: str = "x") -> dict:
    return {
        "session_id": session_id,
        "client_id": client_id,
        "seq": seq,
        "kind": "insert",
        "client_ms": 1_700_000_000_000,
        "caret": position + len(text),
        "position": position,
        "text": text,
    }


# ------------------------------------------------------------------------------ specs and config


def test_assistant_spec_parses_policy_and_value():
    assert parse_assistant_spec("B=smollm2-135m:base-n:20") == (
        "B",
        {"assistant": "smollm2-135m", "policy": "base-n", "n": 20},
    )
    assert parse_assistant_spec("E=runs/models/empower:threshold:4") == (
        "E",
        {"assistant": "runs/models/empower", "policy": "threshold", "eta": 4.0},
    )
    assert parse_assistant_spec("A=runs/models/empower") == ("A", {"assistant": "runs/models/empower"})


@pytest.mark.parametrize(
    "spec, words",
    [
        ("smollm2-135m", "LABEL=MODEL"),
        ("B=smollm2-135m:greedy", "unknown policy 'greedy'"),
        ("B=smollm2-135m:base-n:many", "'many' must be an integer"),
        ("B=m:base-n:2:3", "too many"),
    ],
)
def test_bad_assistant_spec_is_named(spec, words):
    with pytest.raises(ValueError, match=words):
        parse_assistant_spec(spec)


def test_create_config_needs_two_distinct_arms():
    with pytest.raises(ValueError, match="at least 2 arms"):
        StudyCreateConfig(assistants=["A=tiny-random"])
    with pytest.raises(ValueError, match="distinct"):
        StudyCreateConfig(assistants=["A=tiny-random", "A=smollm2-135m"])
    assert StudyCreateConfig(assistants=["A=x B=y:base"]).assistants == ["A=x", "B=y:base"]


def test_too_few_tasks_for_the_design_is_refused(tmp_path):
    config = StudyCreateConfig(
        assistants=ARMS,
        tasks_path=str(write_tasks(tmp_path)),
        tasks_per_assistant=2,
        db=str(tmp_path / "s.sqlite"),
    )
    with pytest.raises(ValueError, match="has 2 task"):
        create_study(open_store(config.db), config)


def test_a_second_study_in_the_same_database_is_refused(study_db, tmp_path):
    config = StudyCreateConfig(assistants=ARMS, tasks_path=str(tmp_path / "toy_tasks.jsonl"), db=study_db)
    with pytest.raises(ValueError, match="already holds study"):
        create_study(open_store(study_db), config)


# ------------------------------------------------------------------------------ randomisation


def test_orders_are_balanced_in_every_block():
    orders = [tuple(assignment(7, i, ["A", "B"], 4, 1)[0]) for i in range(10)]
    for block in range(5):
        assert set(orders[2 * block : 2 * block + 2]) == {("A", "B"), ("B", "A")}


def test_randomisation_is_seeded():
    assert assignment(3, 5, ["A", "B"], 6, 2) == assignment(3, 5, ["A", "B"], 6, 2)
    assert [assignment(1, i, ["A", "B"], 6, 2) for i in range(8)] != [
        assignment(2, i, ["A", "B"], 6, 2) for i in range(8)
    ]


def test_each_participant_meets_each_arm_on_distinct_tasks(study_db):
    with sqlite3.connect(study_db) as con:
        rows = con.execute(
            'select p."order", s.position, a.label, s.task_index from sessions s '
            "join participants p on p.id = s.participant_id join assistants a on a.id = s.assistant_id "
            'order by p.id, s."index"'
        ).fetchall()
    for order, position, label, _ in rows:
        assert json.loads(order)[position - 1] == label
    assert len({(r[0], r[3]) for r in rows}) == len(rows)


def test_tokens_are_opaque_and_unique(study_db):
    tokens = _tokens(study_db) + add_participants(open_store(study_db), 1, 3)
    assert len(set(tokens)) == 5 and all(len(t) >= 20 for t in tokens)


# ------------------------------------------------------------------------------ events


def test_retried_event_is_stored_once(study_db):
    store = open_store(study_db)
    session = _sessions(study_db, _tokens(study_db)[0])[0]
    row = event_row(session, _event(session, "abcdef0123", 1))
    for _ in range(3):
        with store.begin() as db:
            insert_events(db, [row])
    with store() as db:
        assert db.scalar(select(func.count(Event.id))) == 1


def test_events_are_acknowledged_and_replayed_into_the_code(client, study_db):
    token = _tokens(study_db)[0]
    state = client.get(f"/api/participant/{token}").json()
    session, code = state["current"]["session_id"], state["current"]["code"]
    events = [
        _event(session, "e-00000001", 1, len(code), "    return"),
        _event(session, "e-00000002", 2, len(code) + 10, " 2 * x"),
    ]
    assert client.post("/api/events", json={"token": token, "events": events}).json()["acked"] == [
        "e-00000001",
        "e-00000002",
    ]
    assert client.post("/api/events", json={"token": token, "events": events}).status_code == 200
    state = client.get(f"/api/participant/{token}").json()["current"]
    assert state["code"] == code + "    return 2 * x" and state["next_seq"] == 3


def test_participant_page_never_names_the_assistants(client, study_db):
    text = client.get(f"/api/participant/{_tokens(study_db)[0]}").text
    assert "tiny-random" not in text and "base-n" not in text
    assert '"assistant":"Assistant 1"' in text


# ------------------------------------------------------------------------------ bad input: 4xx


def test_malformed_json_is_422_with_a_message(client):
    r = client.post("/api/events", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "malformed JSON" in r.json()["detail"]


def test_wrong_type_names_the_field(client, study_db):
    r = client.post("/api/events", json={"token": _tokens(study_db)[0], "events": [{"session_id": "one"}]})
    assert r.status_code == 422 and "events.0.session_id" in r.json()["detail"]


def test_event_missing_fields_of_its_kind_is_refused(client, study_db):
    token = _tokens(study_db)[0]
    bad = {**_event(_sessions(study_db, token)[0], "abcdefgh1", 1), "kind": "delete"}
    r = client.post("/api/events", json={"token": token, "events": [bad]})
    assert r.status_code == 422 and "needs deleted_text" in r.json()["detail"]


def test_unknown_token_is_404(client):
    assert client.get("/api/participant/not-a-real-token").status_code == 404
    assert client.get("/p/not-a-real-token").status_code == 404


def test_another_participants_session_is_404(client, study_db):
    mine, theirs = _tokens(study_db)
    r = client.post(
        "/api/events",
        json={"token": mine, "events": [_event(_sessions(study_db, theirs)[0], "abcdefgh1", 1)]},
    )
    assert r.status_code == 404 and "does not belong" in r.json()["detail"]


@pytest.mark.parametrize("chunked", [False, True])
def test_oversized_body_is_413(client, study_db, chunked):
    body = json.dumps({"token": _tokens(study_db)[0], "session_id": 1, "state": "x" * 70_000}).encode()
    content = iter([body[:1000], body[1000:]]) if chunked else body
    r = client.post("/api/suggest", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["detail"]


def test_survey_before_the_tasks_are_submitted_is_409(client, study_db):
    r = client.post("/api/survey", json={"token": _tokens(study_db)[0], "enjoy": 1, "relevant": 2})
    assert r.status_code == 409 and "submit every task" in r.json()["detail"]


def test_suggestion_from_another_session_is_refused(client, study_db):
    token = _tokens(study_db)[0]
    session = _sessions(study_db, token)[0]
    shown = {
        "session_id": session,
        "client_id": "abcdefgh9",
        "seq": 1,
        "kind": "suggestion_shown",
        "client_ms": 1,
        "suggestion_id": 999,
    }
    r = client.post("/api/events", json={"token": token, "events": [shown]})
    assert r.status_code == 422 and "suggestion 999" in r.json()["detail"]


# ------------------------------------------------------------------------------ restart


def test_events_survive_a_killed_server_and_retries_do_not_duplicate(study_db, tmp_path):
    db = tmp_path / "study.sqlite"
    token = _tokens(study_db)[0]
    server = StudyServer(db, assistants=False)
    state = httpx.get(f"{server.url}/api/participant/{token}").json()["current"]
    session, start = state["session_id"], len(state["code"])
    first = [_event(session, f"before-{i:04d}", i, start + i - 1) for i in range(1, 6)]
    assert httpx.post(f"{server.url}/api/events", json={"token": token, "events": first}).status_code == 200
    server.kill()  # SIGKILL right after the acknowledgement

    server = StudyServer(db, assistants=False)
    try:
        # the client never saw the acknowledgement of `first`: it re-sends it with the next batch
        second = [_event(session, f"after-{i:04d}", i, start + i - 1) for i in range(6, 9)]
        r = httpx.post(f"{server.url}/api/events", json={"token": token, "events": first + second})
        assert r.status_code == 200
        state = httpx.get(f"{server.url}/api/participant/{token}").json()["current"]
    finally:
        server.kill()
    with sqlite3.connect(db) as con:
        seqs = [
            r[0] for r in con.execute("select seq from events where session_id = ? order by seq", (session,))
        ]
    assert seqs == list(range(1, 9))
    assert state["code"].endswith("x" * 8) and state["next_seq"] == 9
