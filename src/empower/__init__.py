"""empower: code assistants that write the predictable parts and stop where the human decides.

Implements "Training LLM Agents to Empower Humans" (Ellis et al., 2025): build Empower training
pairs from any code corpus, fine-tune assistants, evaluate them with simulated humans, and serve
them to real people. See README.md for the pipeline and commands.
"""

from empower.corpus import CorpusConfig, Document, iter_documents
from empower.labeling import DataConfig, Method, build_data, data_stats
from empower.models import load_model, load_tokenizer
from empower.rule import empower_length, empower_lengths
from empower.sandbox import (
    ExecutionResult,
    SandboxConfig,
    Status,
    run_many,
    run_task_tests,
    validate_references,
)
from empower.scoring import score_documents
from empower.tasks import Task, TestCase, TestType, load_tasks
from empower.train import TrainConfig, merge_adapter  # not `train`: it would shadow the submodule

__all__ = [
    "ExecutionResult",
    "SandboxConfig",
    "Status",
    "Task",
    "TestCase",
    "TestType",
    "load_tasks",
    "run_many",
    "run_task_tests",
    "validate_references",
    "load_model",
    "load_tokenizer",
    "CorpusConfig",
    "Document",
    "iter_documents",
    "DataConfig",
    "Method",
    "build_data",
    "data_stats",
    "empower_length",
    "empower_lengths",
    "score_documents",
    "TrainConfig",
    "merge_adapter",
]
__version__ = "0.1.0"
