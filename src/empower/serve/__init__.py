"""Serving assistants to real people.

- :mod:`empower.serve.server`: the OpenAI-compatible completion server (``empower serve``), speaking
- :mod:`empower.serve.openai_api`: the request schema and error shape of OpenAI's completions API, over
- :mod:`empower.serve.suggestions`: a request's suggestions through the policy module, streamed from
  the in-process engine (:class:`empower.engines.wrappers.Batcher`) or
- :mod:`empower.serve.upstream`: a vLLM server as the engine (``--engine vllm``);
- :mod:`empower.serve.study`: the browser editor for user studies, its store and report.

Nothing is imported here, so ``import empower.serve.study`` does not load torch or FastAPI's app.
"""
