"""The study store: SQLAlchemy 2 models of studies, participants, sessions, events and survey answers.

SQLite by default (a file path or ``sqlite:///...``); any SQLAlchemy URL such as
``postgresql+psycopg://user@host/db`` works unchanged. Events are written one request at a time
as the browser sends them; every event carries a client-generated id, unique per session, so a
client that retries after a lost acknowledgement never creates a duplicate row.

Create a study (Python)::

    store = open_store("study.sqlite")
    create_study(store, StudyCreateConfig(assistants=["A=runs/models/empower", "B=smollm2-135m:base-n:20"],
                                          tasks="humaneval", db="study.sqlite", participants=18))

or ``empower study create --assistants A=... B=... --tasks humaneval --db study.sqlite``.
"""

from __future__ import annotations

import enum
import itertools
import random
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from empower.configs import option, to_dict


def _now() -> datetime:
    return datetime.now(timezone.utc)


class EventKind(str, enum.Enum):
    """What the browser logs; buffer edits (insert, delete, accepted) replay into the final text."""

    INSERT = "insert"  # typed or pasted text at `position`
    DELETE = "delete"  # `deleted_text` removed at `position`
    SHOWN = "suggestion_shown"
    ACCEPTED = "suggestion_accepted"  # the suggestion's text inserted at `position` (Tab)
    REJECTED = "suggestion_rejected"  # Esc
    DISMISSED = "suggestion_dismissed"  # typing something else or moving the caret away
    RUN = "run"  # public tests run; `data` holds the sandbox result
    FINISH = "finish"  # the participant submitted the task; hidden tests run server-side


class Base(DeclarativeBase):
    type_annotation_map = {dict: JSON, list: JSON}


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    seed: Mapped[int] = mapped_column(Integer)
    tasks_per_assistant: Mapped[int] = mapped_column(Integer)
    config: Mapped[dict] = mapped_column(JSON)  # the resolved StudyCreateConfig
    tasks: Mapped[list] = mapped_column(JSON)  # the Task records, so the study never depends on files again
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    assistants: Mapped[list[StudyAssistant]] = relationship(
        back_populates="study", order_by="StudyAssistant.id"
    )


class StudyAssistant(Base):
    __tablename__ = "assistants"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    label: Mapped[str] = mapped_column(String(64))  # the researcher's name ("A"); never sent to participants
    spec: Mapped[str] = mapped_column(String(500))
    config: Mapped[dict] = mapped_column(JSON)  # AssistantConfig fields
    study: Mapped[Study] = relationship(back_populates="assistants")
    __table_args__ = (UniqueConstraint("study_id", "label"),)


class Participant(Base):
    __tablename__ = "participants"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    index: Mapped[int] = mapped_column(Integer)  # enrolment order, drives the randomisation
    token: Mapped[str] = mapped_column(String(64), unique=True)  # opaque; the only identity we keep
    order: Mapped[list] = mapped_column(JSON)  # assistant labels in the order this participant meets them
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    sessions: Mapped[list[StudySession]] = relationship(order_by="StudySession.index")
    __table_args__ = (UniqueConstraint("study_id", "index"),)


class StudySession(Base):
    """One participant solving one task with one assistant (shown as "Assistant <position>")."""

    __tablename__ = "sessions"
    id: Mapped[int] = mapped_column(primary_key=True)
    participant_id: Mapped[int] = mapped_column(ForeignKey("participants.id"))
    index: Mapped[int] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(
        Integer
    )  # 1-based place of the assistant in the participant's order
    assistant_id: Mapped[int] = mapped_column(ForeignKey("assistants.id"))
    task_index: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    final_code: Mapped[str | None] = mapped_column(Text)
    passed: Mapped[bool | None] = mapped_column(Boolean)  # hidden tests on the submitted code
    result: Mapped[dict | None] = mapped_column(JSON)
    assistant: Mapped[StudyAssistant] = relationship()
    participant: Mapped[Participant] = relationship(back_populates="sessions")


class Suggestion(Base):
    """Every suggestion the server produced (shown or not: the client logs `suggestion_shown`)."""

    __tablename__ = "suggestions"
    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id"), index=True)
    assistant_id: Mapped[int] = mapped_column(ForeignKey("assistants.id"))
    state_chars: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    tokens: Mapped[int] = mapped_column(Integer)
    stop_reason: Mapped[str] = mapped_column(String(32))
    latency_ms: Mapped[float] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id"), index=True)
    client_id: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(Integer)  # client order within the session: the replay order
    kind: Mapped[str] = mapped_column(String(32))
    client_ms: Mapped[int] = mapped_column(BigInteger)  # browser clock, ms since the epoch
    server_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    caret: Mapped[int | None] = mapped_column(Integer)  # caret after the event
    position: Mapped[int | None] = mapped_column(Integer)
    text: Mapped[str | None] = mapped_column(Text)
    deleted_text: Mapped[str | None] = mapped_column(Text)
    deleted_from_suggestion: Mapped[int | None] = mapped_column(
        Integer
    )  # client's own count (checked by replay)
    suggestion_id: Mapped[int | None] = mapped_column(ForeignKey("suggestions.id"))
    data: Mapped[dict | None] = mapped_column(JSON)
    __table_args__ = (UniqueConstraint("session_id", "client_id", name="uq_event_client_id"),)


class SurveyAnswer(Base):
    __tablename__ = "survey_answers"
    id: Mapped[int] = mapped_column(primary_key=True)
    participant_id: Mapped[int] = mapped_column(ForeignKey("participants.id"))
    question: Mapped[str] = mapped_column(String(32))
    position: Mapped[int | None] = mapped_column(Integer)  # what the participant chose ("Assistant 2")
    assistant_id: Mapped[int | None] = mapped_column(ForeignKey("assistants.id"))  # resolved server-side
    text: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    __table_args__ = (UniqueConstraint("participant_id", "question"),)


SURVEY_QUESTIONS = {
    "enjoy": "Which assistant would you most enjoy using?",
    "relevant": "Which assistant's suggestions were more relevant?",
}


def database_url(db: str) -> str:
    """A SQLAlchemy URL from either a URL or a plain SQLite file path."""
    return db if "://" in db else f"sqlite:///{db}"


def open_store(db: str) -> sessionmaker[Session]:
    """Connect (creating the tables if missing) and return a session factory."""
    engine = create_engine(database_url(db))
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    Base.metadata.create_all(engine)
    return sessionmaker(engine, expire_on_commit=False)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets the report read while the server writes; synchronous=FULL makes every acknowledged
    # event durable across a crash of the server or the machine.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def engine_of(store: sessionmaker[Session]) -> Engine:
    return store.kw["bind"]


# ---------------------------------------------------------------------------------------------
# Assistant specs and study creation


def parse_assistant_spec(spec: str) -> tuple[str, dict]:
    """``LABEL=MODEL[:POLICY[:N_OR_ETA]]`` -> (label, AssistantConfig fields).

    >>> parse_assistant_spec("B=smollm2-135m:base-n:20")
    ('B', {'assistant': 'smollm2-135m', 'policy': 'base-n', 'n': 20})
    """
    from empower.assistant import Policy

    label, sep, rest = spec.partition("=")
    if not sep or not label.strip() or not rest.strip():
        raise ValueError(
            f"assistant {spec!r}: expected LABEL=MODEL[:POLICY[:N_OR_ETA]], e.g. B=smollm2-135m:base-n:20"
        )
    model, *more = rest.split(":")
    if len(more) > 2:
        raise ValueError(f"assistant {spec!r}: too many ':' parts; expected LABEL=MODEL[:POLICY[:N_OR_ETA]]")
    fields: dict = {"assistant": model}
    if more:
        try:
            policy = Policy(more[0])
        except ValueError:
            known = ", ".join(p.value for p in Policy)
            raise ValueError(f"assistant {spec!r}: unknown policy {more[0]!r}; known: {known}") from None
        fields["policy"] = policy.value
        if len(more) == 2:
            try:
                if policy is Policy.BASE_N:
                    fields["n"] = int(more[1])
                elif policy is Policy.THRESHOLD:
                    fields["eta"] = float(more[1])
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(
                    f"assistant {spec!r}: {more[1]!r} must be an integer N for base-n or a float eta (bits) "
                    f"for threshold; policy {policy.value} takes no value"
                ) from None
    return label.strip(), fields


@dataclass
class StudyCreateConfig:
    assistants: list[str] = option(
        help="LABEL=MODEL[:POLICY[:N_OR_ETA]] for each arm, e.g. A=runs/models/empower B=smollm2-135m:base-n:20",
        greedy=True,
    )
    tasks: str = option("humaneval", "task set format: humaneval, mbpp, livecodebench or leetcode")
    tasks_path: str | None = option(
        None, "a task file or folder in that format (default: the set's own source)"
    )
    tasks_limit: int | None = option(None, "keep the first N tasks of the set")
    db: str = option("study.sqlite", "SQLite file or SQLAlchemy URL of the study store")
    name: str = option("study", "study name (shown to participants)")
    participants: int = option(
        0, "participant tokens to create now (more later with `empower study participants`)"
    )
    tasks_per_assistant: int = option(1, "tasks each participant solves with each assistant")
    seed: int = option(0, "seed of the assistant-order and task randomisation")
    max_new_tokens: int = option(64, "cap on suggestion length in tokens, for every arm")

    def __post_init__(self):
        # `--assistants "A=x B=y"` and repeated `--assistants A=x --assistants B=y` both work.
        items = [self.assistants] if isinstance(self.assistants, str) else list(self.assistants)
        self.assistants = [spec for item in items for spec in item.split()]
        if len(self.assistants) < 2:
            raise ValueError(f"assistants: an A/B study needs at least 2 arms, got {self.assistants!r}")
        labels = [parse_assistant_spec(s)[0] for s in self.assistants]
        if len(set(labels)) != len(labels):
            raise ValueError(f"assistants: labels must be distinct, got {labels}")
        for name in ("participants", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("tasks_per_assistant", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


def task_to_dict(task) -> dict:
    return to_dict(task)


def task_from_dict(values: dict):
    from empower.tasks import Task, TestCase, TestType

    values = dict(values)
    values["test_type"] = TestType(values["test_type"])
    for key in ("test_cases", "public_test_cases"):
        values[key] = tuple(TestCase(**case) for case in values.get(key, ()))
    return Task(**values)


def create_study(store: sessionmaker[Session], config: StudyCreateConfig) -> Study:
    """Record a study: its arms, its tasks (copied in), and ``config.participants`` tokens."""
    from empower.tasks import load_tasks

    tasks = load_tasks(config.tasks, config.tasks_path, limit=config.tasks_limit)
    needed = config.tasks_per_assistant * len(config.assistants)
    if len(tasks) < needed:
        raise ValueError(
            f"tasks: {config.tasks_path or config.tasks!r} has {len(tasks)} task(s) but {len(config.assistants)} assistants x "
            f"{config.tasks_per_assistant} task(s) each need {needed}"
        )
    with store.begin() as db:
        existing = db.scalars(select(Study)).first()
        if existing is not None:
            # One study per database: tokens, report and server all refer to "the" study in it.
            raise ValueError(
                f"db: {config.db} already holds study '{existing.name}' (created {existing.created_at:%Y-%m-%d}); "
                "use a new --db file, or `empower study participants` to enrol more people"
            )
        study = Study(
            name=config.name,
            seed=config.seed,
            tasks_per_assistant=config.tasks_per_assistant,
            config=to_dict(config),
            tasks=[task_to_dict(t) for t in tasks],
        )
        for spec in config.assistants:
            label, fields = parse_assistant_spec(spec)
            fields["max_new_tokens"] = config.max_new_tokens
            study.assistants.append(StudyAssistant(label=label, spec=spec.partition("=")[2], config=fields))
        db.add(study)
    add_participants(store, study.id, config.participants)
    return study


def assignment(seed: int, index: int, labels: list[str], n_tasks: int, per_assistant: int):
    """The recorded randomisation of participant ``index``: (assistant order, task indices per position).

    Orders are balanced in permuted blocks: every block of ``len(labels)!`` consecutive participants
    sees each order once, in a seeded random sequence, so arms are counterbalanced at any stop.
    """
    orders = list(itertools.permutations(labels))
    block, within = divmod(index, len(orders))
    random.Random(f"{seed}:order:{block}").shuffle(orders)
    tasks = list(range(n_tasks))
    random.Random(f"{seed}:tasks:{index}").shuffle(tasks)
    chunks = [tasks[i * per_assistant : (i + 1) * per_assistant] for i in range(len(labels))]
    return list(orders[within]), chunks


def add_participants(store: sessionmaker[Session], study_id: int, count: int) -> list[str]:
    """Enrol ``count`` participants; returns their opaque tokens (hand each person one link)."""
    tokens = []
    with store.begin() as db:
        study = db.get(Study, study_id)
        if study is None:
            raise ValueError(f"study id {study_id} does not exist in this database")
        by_label = {a.label: a for a in study.assistants}
        start = len(db.scalars(select(Participant.id).where(Participant.study_id == study_id)).all())
        for index in range(start, start + count):
            order, chunks = assignment(
                study.seed, index, list(by_label), len(study.tasks), study.tasks_per_assistant
            )
            participant = Participant(
                study_id=study_id, index=index, token=secrets.token_urlsafe(18), order=order
            )
            session_index = 0
            for position, (label, chunk) in enumerate(zip(order, chunks, strict=True), start=1):
                for task_index in chunk:
                    participant.sessions.append(
                        StudySession(
                            index=session_index,
                            position=position,
                            assistant=by_label[label],
                            task_index=task_index,
                        )
                    )
                    session_index += 1
            db.add(participant)
            tokens.append(participant.token)
    return tokens


def latest_study(db: Session) -> Study:
    study = db.scalars(select(Study).order_by(Study.id.desc())).first()
    if study is None:
        raise ValueError("the database holds no study; create one with `empower study create`")
    return study


def event_row(session_id: int, values: dict) -> dict:
    """Column values of one incoming event (unknown keys were already refused by the API schema)."""
    names = {c.name for c in Event.__table__.columns} - {"id", "server_time", "session_id"}
    row = {k: v for k, v in values.items() if k in names}
    row.update(session_id=session_id, server_time=_now())
    if isinstance(row.get("kind"), enum.Enum):
        row["kind"] = row["kind"].value
    return row


def insert_events(db: Session, rows: list[dict]) -> None:
    """Insert events, silently skipping any (session_id, client_id) already stored (client retries)."""
    if not rows:
        return
    dialect = db.get_bind().dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        _insert_events_portable(db, rows)
        return
    statement = insert(Event).on_conflict_do_nothing(index_elements=["session_id", "client_id"])
    db.execute(statement, rows)


def _insert_events_portable(db: Session, rows: list[dict]) -> None:
    for row in rows:
        exists = db.scalar(
            select(Event.id).where(Event.session_id == row["session_id"], Event.client_id == row["client_id"])
        )
        if exists is None:
            db.add(Event(**row))


__all__ = [
    "EventKind",
    "Study",
    "StudyAssistant",
    "Participant",
    "StudySession",
    "Suggestion",
    "Event",
    "SurveyAnswer",
    "StudyCreateConfig",
    "open_store",
    "create_study",
    "add_participants",
    "assignment",
    "parse_assistant_spec",
    "insert_events",
]
