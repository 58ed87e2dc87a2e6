"""`empower study ...`: create a double-blind A/B user study, serve its editor, report its results."""

from __future__ import annotations

from dataclasses import dataclass

import typer

from empower.cli import app
from empower.configs import config_command, option
from empower.serve.study.app import StudyServeConfig, serve_study
from empower.serve.study.report import StudyReportConfig, write_study_report
from empower.serve.study.store import (
    StudyCreateConfig,
    add_participants,
    create_study,
    latest_study,
    open_store,
)

study_app = typer.Typer(
    help="User studies: an editor with inline suggestions, event logging, and the report."
)
app.add_typer(study_app, name="study")


def _print_links(tokens: list[str]) -> None:
    for token in tokens:
        typer.echo(f"participant link: /p/{token}")


@config_command(study_app, StudyCreateConfig, "create")
def create(config: StudyCreateConfig):
    """Record a study (arms, tasks, randomisation seed) and enrol participants with opaque tokens."""
    store = open_store(config.db)
    study = create_study(store, config)
    typer.echo(
        f"study {study.id} '{study.name}' in {config.db}: {len(study.tasks)} tasks, "
        f"arms {', '.join(a.label + '=' + a.spec for a in study.assistants)}"
    )
    _print_links(_tokens(store, study.id))


def _tokens(store, study_id: int) -> list[str]:
    from sqlalchemy import select

    from empower.serve.study.store import Participant

    with store() as db:
        return list(
            db.scalars(
                select(Participant.token).where(Participant.study_id == study_id).order_by(Participant.index)
            )
        )


@dataclass
class StudyParticipantsConfig:
    db: str = option("study.sqlite", "SQLite file or SQLAlchemy URL of the study store")
    count: int = option(1, "participants to enrol (each gets the next assignment of the randomisation)")

    def __post_init__(self):
        if self.count < 1:
            raise ValueError(f"count: must be >= 1, got {self.count}")


@config_command(study_app, StudyParticipantsConfig, "participants")
def participants(config: StudyParticipantsConfig):
    """Enrol more participants in the latest study and print their links."""
    store = open_store(config.db)
    with store() as db:
        study_id = latest_study(db).id
    _print_links(add_participants(store, study_id, config.count))


@config_command(study_app, StudyServeConfig, "serve")
def serve(config: StudyServeConfig):
    """Serve the study page; participants open http://HOST:PORT/p/<token>."""
    serve_study(config)


@config_command(study_app, StudyReportConfig, "report")
def report(config: StudyReportConfig):
    """Per-assistant metrics and the paper's tests, as Markdown (and JSON with --out)."""
    typer.echo(write_study_report(config).to_markdown())
