"""`empower serve`: an OpenAI-compatible completion server for an assistant (see docs/serving.md)."""

from __future__ import annotations

from empower.cli import app
from empower.configs import config_command
from empower.serve.server import ServeConfig, serve


@config_command(app, ServeConfig, "serve")
def serve_command(config: ServeConfig) -> None:
    """Serve an assistant at http://HOST:PORT/v1 (POST /v1/completions, GET /v1/models, GET /health)."""
    serve(config)
