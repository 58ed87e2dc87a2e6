"""Shared fixtures: the tiny random model (seconds) for unit tests, the embedded one for a few."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from empower import models
from serve_process import free_port

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    return models.resolve(models.TINY_MODEL)


@pytest.fixture(scope="session")
def tiny(tiny_model_path):
    """(model, tokenizer) of the tiny random Llama, fp32 on CPU."""
    return models.load_model(tiny_model_path, device="cpu")


@pytest.fixture(scope="session")
def smol():
    """(model, tokenizer) of the embedded SmolLM2-135M (integration tests only)."""
    return models.load_model(models.DEFAULT_MODEL, device="cpu")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared problem sets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """A real llama.cpp server (llama-cpp-python) serving the embedded SmolLM2 GGUF on 127.0.0.1, as
    ``smollm2``; its base URL ends in /v1."""
    pytest.importorskip(
        "llama_cpp.server", reason="llama-cpp-python[server] not installed (make install-servers)"
    )
    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(models.embedded_gguf("smollm2-135m")),
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--model_alias", "smollm2",
    ]  # fmt: skip
    # Its log goes to a file: llama.cpp logs a lot, and an unread pipe would fill and block it.
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        while True:  # wait for the port; a dead process fails the fixture with its log
            if process.poll() is not None:
                pytest.fail(f"llama_cpp.server exited {process.returncode}: {log_path.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
