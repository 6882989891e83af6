"""Measuring quantisation damage: perplexity, KL and top-1 agreement against the float model."""

from lowbit.eval.metrics import EvalConfig, ReferenceStats, TextResult, evaluate_tokens, reference_stats

__all__ = ["EvalConfig", "ReferenceStats", "TextResult", "evaluate_tokens", "reference_stats"]
