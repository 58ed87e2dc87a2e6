"""The user-study system: a browser editor with inline suggestions, its event store, and the report.

- :mod:`empower.serve.study.store`: SQLAlchemy models and study creation (``empower study create``)
- :mod:`empower.serve.study.app`: the FastAPI server behind the editor page (``empower study serve``)
- :mod:`empower.serve.study.report`: metrics and tests per assistant (``empower study report``)
- ``web/``: the editor's JavaScript source (CodeMirror 6), bundled into ``static/editor.js`` by the set-up
"""
