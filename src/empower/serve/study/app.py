"""The study server: FastAPI routes behind the study editor page.

Participants open ``/p/<token>`` (an opaque random token is their only identity). The page asks
``/api/suggest`` for inline suggestions, sends every edit and suggestion event to ``/api/events``
(each with a client id, acknowledged only once committed, so retries never duplicate), runs the
public tests with ``/api/run`` (sandbox), submits with ``/api/finish`` (hidden tests) and answers
the survey with ``/api/survey``. Assistants are named to the browser only by their position
("Assistant 1", "Assistant 2") in the participant's randomised order.

Run: ``empower study serve --db study.sqlite --port 8080`` (localhost only unless ``--host``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import func, select

from empower.configs import config_from_dict, option
from empower.serve.body_limit import BodyLimit
from empower.serve.study.report import replay
from empower.serve.study.store import (
    SURVEY_QUESTIONS,
    Event,
    EventKind,
    Participant,
    StudySession,
    Suggestion,
    SurveyAnswer,
    event_row,
    insert_events,
    latest_study,
    open_store,
    task_from_dict,
)

logger = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
BUILD_HINT = "run `make install` (npm ci && npm run build in src/empower/serve/study/web)"


@dataclass
class StudyServeConfig:
    db: str = option("study.sqlite", "SQLite file or SQLAlchemy URL of the study store")
    host: str = option("127.0.0.1", "interface to listen on (localhost only by default)")
    port: int = option(8080, "port of the study page")
    debounce_ms: int = option(350, "pause in typing (ms) before the editor asks for a suggestion")
    max_request_kb: int = option(512, "largest request body accepted, in KiB (larger: 413)")

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ValueError(f"port: must be in 1..65535, got {self.port}")
        if self.debounce_ms < 0:
            raise ValueError(f"debounce_ms: must be >= 0, got {self.debounce_ms}")
        if self.max_request_kb < 1:
            raise ValueError(f"max_request_kb: must be >= 1, got {self.max_request_kb}")


# ------------------------------------------------------------------------------ request schemas

Text = Annotated[str, Field(max_length=200_000)]
ClientId = Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
Token = Annotated[str, Field(min_length=8, max_length=64)]


class _Request(BaseModel):
    """Unknown fields are refused (422 naming them) rather than silently dropped."""

    model_config = ConfigDict(extra="forbid")


class EventIn(_Request):
    session_id: int
    client_id: ClientId
    seq: int = Field(ge=0)
    kind: EventKind
    client_ms: int = Field(ge=0)
    caret: int | None = Field(None, ge=0)
    position: int | None = Field(None, ge=0)
    text: Text | None = None
    deleted_text: Text | None = None
    deleted_from_suggestion: int | None = Field(None, ge=0)
    suggestion_id: int | None = None
    data: dict | None = None

    @model_validator(mode="after")
    def _fields_of_kind(self):
        needs = {
            EventKind.INSERT: ("position", "text"),
            EventKind.DELETE: ("position", "deleted_text"),
            EventKind.ACCEPTED: ("position", "text", "suggestion_id"),
            EventKind.SHOWN: ("suggestion_id",),
            EventKind.REJECTED: ("suggestion_id",),
            EventKind.DISMISSED: ("suggestion_id",),
        }
        if self.kind in (EventKind.RUN, EventKind.FINISH):
            raise ValueError(
                f"kind {self.kind.value!r} is recorded by /api/run and /api/finish, not /api/events"
            )
        missing = [name for name in needs[self.kind] if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.kind.value} event needs {', '.join(missing)}")
        return self


class EventsIn(_Request):
    token: Token
    events: list[EventIn] = Field(max_length=1000)


class SuggestIn(_Request):
    token: Token
    session_id: int
    state: Text


class CodeIn(_Request):
    """A run or a submission: the code, plus the event identity so a retry returns the same result."""

    token: Token
    session_id: int
    client_id: ClientId
    seq: int = Field(ge=0)
    client_ms: int = Field(ge=0)
    caret: int | None = Field(None, ge=0)
    code: Text


class SurveyIn(_Request):
    token: Token
    enjoy: int = Field(ge=1)
    relevant: int = Field(ge=1)
    comment: Annotated[str, Field(max_length=4000)] = ""


# ------------------------------------------------------------------------------------ the app


class StudyServer:
    """The server's state: the store, the loaded assistants and one worker thread per assistant."""

    def __init__(self, config: StudyServeConfig):
        if "://" not in config.db and not Path(config.db).is_file():
            raise FileNotFoundError(
                f"study database {config.db} does not exist; run `empower study create` first"
            )
        if not (STATIC / "editor.js").is_file():
            raise FileNotFoundError(f"the editor bundle {STATIC / 'editor.js'} is missing: {BUILD_HINT}")
        self.config = config
        self.store = open_store(config.db)
        with self.store() as db:
            study = latest_study(db)
            self.study_id, self.study_name = study.id, study.name
            self.tasks = [task_from_dict(t) for t in study.tasks]
            self.assistant_configs = {a.id: (a.label, a.config) for a in study.assistants}
        self.assistants: dict[int, object] = {}
        # One thread per assistant: a model is never run by two threads at once, and the event
        # loop stays free while it generates.
        self.workers = {
            a: ThreadPoolExecutor(1, thread_name_prefix=f"assistant-{a}") for a in self.assistant_configs
        }
        self.latest_request: dict[int, int] = {}
        self.load_error: str | None = None

    def load_assistants(self) -> None:
        """Build every arm's assistant; a failure is kept and reported by /health and /api/suggest."""
        try:
            from empower.assistant import AssistantConfig, build_assistant

            for assistant_id, (label, fields) in self.assistant_configs.items():
                config = config_from_dict(AssistantConfig, fields, where=f"assistant {label}")
                self.assistants[assistant_id] = build_assistant(config)
                logger.info("assistant %s loaded (%s)", label, fields.get("assistant"))
        except Exception as err:  # noqa: BLE001 - any loading failure must reach the researcher, not kill the server
            self.load_error = f"{type(err).__name__}: {err}"
            logger.error("assistants failed to load: %s", self.load_error)

    def session_of(self, db, token: str, session_id: int | None = None):
        participant = db.scalars(
            select(Participant).where(Participant.token == token, Participant.study_id == self.study_id)
        ).first()
        if participant is None:
            raise HTTPException(404, "unknown participant token; use the exact link you were given")
        if session_id is None:
            return participant, None
        session = next((s for s in participant.sessions if s.id == session_id), None)
        if session is None:
            raise HTTPException(404, f"session {session_id} does not belong to this participant")
        return participant, session

    def state(self, token: str) -> dict:
        with self.store.begin() as db:
            participant, _ = self.session_of(db, token)
            current = next((s for s in participant.sessions if s.finished_at is None), None)
            sessions = [
                {
                    "id": s.id,
                    "index": s.index,
                    "position": s.position,
                    "assistant": f"Assistant {s.position}",
                    "task_id": self.tasks[s.task_index].task_id,
                    "statement": self.tasks[s.task_index].statement,
                    "prompt": self.tasks[s.task_index].prompt,
                    "finished": s.finished_at is not None,
                }
                for s in participant.sessions
            ]
            out = {
                "study": self.study_name,
                "debounce_ms": self.config.debounce_ms,
                "sessions": sessions,
                "current": None,
                "survey_done": participant.finished_at is not None,
                "survey": {
                    "questions": SURVEY_QUESTIONS,
                    "positions": sorted({s.position for s in participant.sessions}),
                },
            }
            if current is not None:
                if current.started_at is None:
                    current.started_at = datetime.now(timezone.utc)
                events = db.scalars(
                    select(Event).where(Event.session_id == current.id).order_by(Event.seq)
                ).all()
                try:
                    code = replay(self.tasks[current.task_index].prompt, events).text
                except ValueError as err:  # never block a participant on a logging defect; keep it visible
                    logger.error("session %s does not replay: %s", current.id, err)
                    code = self.tasks[current.task_index].prompt
                next_seq = db.scalar(select(func.max(Event.seq)).where(Event.session_id == current.id))
                out["current"] = {"session_id": current.id, "code": code, "next_seq": (next_seq or 0) + 1}
            return out

    def record_events(self, body: EventsIn) -> list[str]:
        with self.store.begin() as db:
            participant, _ = self.session_of(db, body.token)
            sessions = {s.id for s in participant.sessions}
            rows = []
            for e in body.events:
                if e.session_id not in sessions:
                    raise HTTPException(404, f"session {e.session_id} does not belong to this participant")
                rows.append(event_row(e.session_id, e.model_dump()))
            cited = {e.suggestion_id for e in body.events if e.suggestion_id is not None}
            if cited:
                known = dict(
                    db.execute(
                        select(Suggestion.id, Suggestion.session_id).where(Suggestion.id.in_(cited))
                    ).all()
                )
                for e in body.events:
                    if e.suggestion_id is not None and known.get(e.suggestion_id) != e.session_id:
                        raise HTTPException(
                            422, f"suggestion {e.suggestion_id} was not made in session {e.session_id}"
                        )
            insert_events(db, rows)
        return [e.client_id for e in body.events]

    async def suggest(self, body: SuggestIn) -> dict:
        with self.store() as db:
            _, session = self.session_of(db, body.token, body.session_id)
            if session.finished_at is not None:
                raise HTTPException(409, f"session {session.id} is already submitted")
            assistant_id, task = session.assistant_id, self.tasks[session.task_index]
        ticket = self.latest_request.get(body.session_id, 0) + 1
        self.latest_request[body.session_id] = ticket

        def generate():
            # A newer request for this session supersedes queued ones: skip the stale work.
            if self.latest_request.get(body.session_id) != ticket:
                return None
            from empower.assistant import SuggestionRequest

            start = time.perf_counter()
            suggestion = self.assistants[assistant_id].suggest(
                [SuggestionRequest(body.state, task.statement)]
            )[0]
            return suggestion, (time.perf_counter() - start) * 1000

        produced = await asyncio.get_running_loop().run_in_executor(self.workers[assistant_id], generate)
        if produced is None:
            return {"suggestion_id": None, "text": "", "stale": True}
        suggestion, latency_ms = produced
        with self.store.begin() as db:
            row = Suggestion(
                session_id=body.session_id,
                assistant_id=assistant_id,
                state_chars=len(body.state),
                text=suggestion.text,
                tokens=suggestion.tokens,
                stop_reason=str(getattr(suggestion.stop_reason, "value", suggestion.stop_reason)),
                latency_ms=latency_ms,
            )
            db.add(row)
        return {"suggestion_id": row.id, "text": suggestion.text, "stale": False}

    async def run_code(self, body: CodeIn, kind: EventKind) -> dict:
        """Run public tests (``run``) or submit and run hidden ones (``finish``); retries are idempotent."""
        from empower.sandbox import run_task_tests

        with self.store() as db:
            _, session = self.session_of(db, body.token, body.session_id)
            done = db.scalars(
                select(Event).where(Event.session_id == session.id, Event.client_id == body.client_id)
            ).first()
            if done is not None:
                return done.data
            if kind is EventKind.FINISH and session.finished_at is not None:
                return session.result
            task = self.tasks[session.task_index]
        public_only = kind is EventKind.RUN
        result = await asyncio.to_thread(run_task_tests, task, body.code, public_only=public_only)
        data = {
            "status": str(getattr(result.status, "value", result.status)),
            "passed": str(getattr(result.status, "value", result.status)) == "passed",
            "message": result.message[:4000],
            "duration_s": result.duration_s,
            "first_failure": result.first_failure,
            "public_only": public_only,
        }
        fields = body.model_dump(exclude={"token", "code"})
        row = event_row(body.session_id, {**fields, "kind": kind, "text": body.code, "data": data})
        with self.store.begin() as db:
            insert_events(db, [row])
            if kind is EventKind.FINISH:
                session = db.get(StudySession, body.session_id)
                if session.finished_at is None:
                    session.finished_at = datetime.now(timezone.utc)
                    session.final_code, session.passed, session.result = body.code, data["passed"], data
        return data

    def survey(self, body: SurveyIn) -> dict:
        with self.store.begin() as db:
            participant, _ = self.session_of(db, body.token)
            if participant.finished_at is not None:
                return {"ok": True, "already_answered": True}
            unfinished = [s.index + 1 for s in participant.sessions if s.finished_at is None]
            if unfinished:
                raise HTTPException(
                    409, f"submit every task before the survey; task(s) {unfinished} are open"
                )
            by_position = {s.position: s.assistant_id for s in participant.sessions}
            for question in SURVEY_QUESTIONS:
                position = getattr(body, question)
                if position not in by_position:
                    raise HTTPException(
                        422, f"{question}: choose one of assistants {sorted(by_position)}, got {position}"
                    )
                db.add(
                    SurveyAnswer(
                        participant_id=participant.id,
                        question=question,
                        position=position,
                        assistant_id=by_position[position],
                    )
                )
            if body.comment.strip():
                db.add(
                    SurveyAnswer(participant_id=participant.id, question="comment", text=body.comment.strip())
                )
            participant.finished_at = datetime.now(timezone.utc)
        return {"ok": True, "already_answered": False}


def create_app(config: StudyServeConfig, load_assistants: bool = True) -> FastAPI:
    """The study's FastAPI app (``load_assistants=False`` for tests that never ask for suggestions)."""
    server = StudyServer(config)

    @asynccontextmanager
    async def lifespan(_app):
        # Assistants load in the background: the page, the event log and the run button work at
        # once (a restarted server takes back queued events immediately); /api/suggest answers
        # 503 until the models are in memory.
        loading = asyncio.create_task(asyncio.to_thread(server.load_assistants)) if load_assistants else None
        yield
        if loading is not None and not loading.done():
            loading.cancel()
        for worker in server.workers.values():
            worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="empower study", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, err: RequestValidationError):
        problems = "; ".join(
            f"malformed JSON at character {e['loc'][-1]}: {e.get('ctx', {}).get('error', e['msg'])}"
            if e["type"] == "json_invalid"
            else f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
            for e in err.errors()
        )
        return JSONResponse({"detail": f"invalid request: {problems}"}, status_code=422)

    @app.get("/health")
    def health():
        return {
            "status": "ok",
            "study": server.study_name,
            "assistants_loaded": len(server.assistants),
            "assistants": len(server.assistant_configs),
            "assistant_error": server.load_error,
        }

    @app.get("/")
    def index():
        return JSONResponse(
            {"detail": "open the personal study link you were given (/p/<token>)"}, status_code=404
        )

    @app.get("/p/{token}")
    def page(token: str):
        with server.store() as db:
            server.session_of(db, token)
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/api/participant/{token}")
    def participant_state(token: str):
        return server.state(token)

    @app.post("/api/events")
    def events(body: EventsIn):
        return {"acked": server.record_events(body)}

    @app.post("/api/suggest")
    async def suggest(body: SuggestIn):
        if server.load_error:
            raise HTTPException(503, f"the assistants failed to load: {server.load_error}")
        if len(server.assistants) < len(server.assistant_configs):
            raise HTTPException(503, "the assistants are still loading; try again in a few seconds")
        return await server.suggest(body)

    @app.post("/api/run")
    async def run(body: CodeIn):
        return await server.run_code(body, EventKind.RUN)

    @app.post("/api/finish")
    async def finish(body: CodeIn):
        return await server.run_code(body, EventKind.FINISH)

    @app.post("/api/survey")
    def survey(body: SurveyIn):
        return server.survey(body)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(
        BodyLimit,
        limit=config.max_request_kb * 1024,
        refuse=lambda message: JSONResponse({"detail": message}, status_code=413),
    )
    return app


def serve_study(config: StudyServeConfig) -> None:
    """Run the study server until interrupted (uvicorn, one process)."""
    import uvicorn

    app = create_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
