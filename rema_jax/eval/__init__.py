"""Evaluation: metrics, the resumable harness, rollout-backed solvers, the Table-1 markdown."""

from rema_jax.eval.harness import EvalSettings, evaluate_benchmark, read_samples, run_evaluation, summarize
from rema_jax.eval.metrics import judge_accuracy, maj_at_k, majority_index, mean_pass_at_k, pass_at_k
from rema_jax.eval.table import markdown_table

__all__ = [
    "EvalSettings",
    "evaluate_benchmark",
    "judge_accuracy",
    "maj_at_k",
    "majority_index",
    "markdown_table",
    "mean_pass_at_k",
    "pass_at_k",
    "read_samples",
    "run_evaluation",
    "summarize",
]
