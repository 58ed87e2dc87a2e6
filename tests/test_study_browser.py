"""The study editor in a real browser: Debian's chromium driven by Playwright against `empower study serve`.

A participant opens their link, types, receives ghost suggestions, accepts one with Tab, deletes
two of its characters, rejects the next with Esc, runs the public tests, submits both tasks and
answers the survey; then the database rows and `empower study report` must tell that same story.

Needs /usr/bin/chromium (`make browser`; CI installs it). Skipped without it, except under CI.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from study_server import EMPOWER, SOLUTIONS, StudyServer, create_study

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

playwright_api = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists() and not os.environ.get("CI"):
    pytest.skip(f"{CHROMIUM} not installed (run `make browser`)", allow_module_level=True)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    db = create_study(folder)
    server = StudyServer(db)
    yield db, server
    server.kill()


@pytest.fixture(scope="module")
def page(study):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 760})
        yield page
        browser.close()


def _rows(db: Path, sql: str, *args):
    with sqlite3.connect(db) as con:
        con.row_factory = sqlite3.Row
        return con.execute(sql, args).fetchall()


def _editor_text(page) -> str:
    return page.evaluate("window.study.session.view.state.doc.toString()")


def _ghost(page) -> str:
    page.wait_for_selector(".cm-ghost", state="attached")
    return page.eval_on_selector(".cm-ghost", "el => el.textContent")


def _end_of_doc(page):
    page.evaluate(
        "(() => { const v = window.study.session.view; v.focus();"
        " v.dispatch({selection: {anchor: v.state.doc.length}}); })()"
    )


def _replace_all(page, text: str):
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(text)


def test_participant_session_end_to_end(study, page, tmp_path):
    db, server = study
    token = _rows(db, "select token from participants")[0]["token"]
    page.goto(f"{server.url}/p/{token}")
    page.wait_for_selector(".cm-content")
    assert page.inner_text("#assistant-name") == "Assistant 1"
    assert page.is_hidden("#survey-view") and page.is_hidden("#thanks-view")
    prompt = _editor_text(page)

    # 1. type; a ghost suggestion appears after the debounce; typing its first character keeps
    #    the rest on screen; Tab accepts the rest
    _end_of_doc(page)
    page.keyboard.type("    return 2")
    ghost = _ghost(page)
    page.screenshot(path=str(tmp_path / "ghost.png"))
    assert len(ghost) >= 2, f"the tiny model's suggestion {ghost!r} is too short for this test"
    page.keyboard.insert_text(ghost[0])
    first = ghost[1:]
    assert _ghost(page) == first
    page.keyboard.press("Tab")
    assert _editor_text(page) == prompt + "    return 2" + ghost
    assert page.query_selector(".cm-ghost") is None
    # 2. two characters of the accepted suggestion deleted
    page.keyboard.press("Backspace")
    page.keyboard.press("Backspace")
    # 3. the next ghost is rejected with Esc
    _ghost(page)
    page.keyboard.press("Escape")
    assert page.query_selector(".cm-ghost") is None

    # 4. replace everything with a correct program and run the public tests
    task_id = _rows(db, "select task_index from sessions order by id")[0]["task_index"]
    solution = list(SOLUTIONS.values())[task_id]
    _replace_all(page, solution)
    page.click("#run")
    page.wait_for_selector("#output.passed")
    assert "public tests passed" in page.inner_text("#output")
    page.screenshot(path=str(tmp_path / "run.png"))

    # 5. submit; task 2 comes with Assistant 2; solve and submit it too
    page.click("#submit")
    page.wait_for_function("document.querySelector('#assistant-name').textContent === 'Assistant 2'")
    second_task = _rows(db, "select task_index from sessions order by id")[1]["task_index"]
    page.wait_for_selector(".cm-content")
    # events typed while the server is unreachable stay queued; reopening the page loses nothing
    second_prompt = _editor_text(page)
    page.route("**/api/events", lambda route: route.abort())
    _end_of_doc(page)
    page.keyboard.type("    return")
    page.wait_for_function("document.querySelector('#save-status').textContent.startsWith('offline')")
    assert page.evaluate("window.study.queue.items.length") >= len("    return")
    page.unroute("**/api/events")
    page.reload()
    page.wait_for_selector(".cm-content")
    assert _editor_text(page) == second_prompt + "    return"
    _replace_all(page, list(SOLUTIONS.values())[second_task])
    page.click("#submit")

    # 6. the survey: enjoy Assistant 1, relevance Assistant 2
    page.wait_for_selector("#survey-view:not([hidden])")
    page.check("input[name=enjoy][value='1']")
    page.check("input[name=relevant][value='2']")
    page.screenshot(path=str(tmp_path / "survey.png"))
    page.click("#survey-submit")
    page.wait_for_selector("#thanks-view:not([hidden])")

    _check_database(db, first)
    _check_report(db, first, tmp_path)


def _check_database(db: Path, first: str) -> None:
    sessions = _rows(db, "select * from sessions order by id")
    assert [s["passed"] for s in sessions] == [1, 1]
    first_session = sessions[0]["id"]
    kinds = [
        r["kind"]
        for r in _rows(db, "select kind from events where session_id = ? order by seq", first_session)
    ]
    assert kinds.count("suggestion_accepted") == 1
    assert kinds.count("suggestion_rejected") == 1
    assert kinds.count("run") == 1 and kinds.count("finish") == 1
    assert (
        kinds.index("suggestion_shown")
        < kinds.index("suggestion_accepted")
        < kinds.index("suggestion_rejected")
    )
    accepted = _rows(db, "select * from events where kind = 'suggestion_accepted'")[0]
    assert accepted["text"] == first and accepted["caret"] == accepted["position"] + len(first)
    assert json.loads(accepted["data"]) == {"typed": 1}
    # every character of the accepted suggestion was deleted: 2 by Backspace, the rest by the rewrite
    deleted = _rows(
        db, "select sum(deleted_from_suggestion) as n from events where session_id = ?", first_session
    )
    assert deleted[0]["n"] == len(first)
    seqs = [r["seq"] for r in _rows(db, "select seq from events where session_id = ?", first_session)]
    assert len(seqs) == len(set(seqs))
    order = json.loads(_rows(db, 'select "order" from participants')[0]["order"])
    answers = {r["question"]: r for r in _rows(db, "select * from survey_answers")}
    labels = {r["id"]: r["label"] for r in _rows(db, "select id, label from assistants")}
    assert labels[answers["enjoy"]["assistant_id"]] == order[0]
    assert labels[answers["relevant"]["assistant_id"]] == order[1]


def _check_report(db: Path, first: str, tmp_path: Path) -> None:
    out = tmp_path / "report"
    run = subprocess.run(
        [*EMPOWER, "study", "report", "--db", str(db), "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    assert "# Study report: toy study" in run.stdout
    report = json.loads((out / "study_report.json").read_text())
    assert report["replay_mismatches"] == []
    assert report["finished_participants"] == 1
    order = json.loads(_rows(db, 'select "order" from participants')[0]["order"])
    arm = next(a for a in report["arms"] if a["label"] == order[0])
    assert arm["accepted"] == 1 and arm["shown"] >= 2
    assert arm["chars_deleted_from_accepted"] == len(first)
    assert arm["task_success"] == 1.0
    enjoy = next(p for p in report["preferences"] if p["question"] == "enjoy")
    assert enjoy["counts"][order[0]] == 1 and enjoy["answers"] == 1
