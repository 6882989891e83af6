"""`evaluate_tasks`: downstream task accuracy of a model, natively or through lm-eval, with intervals.

```python
import lowbit
q = lowbit.quantize(lowbit.load_model(), lowbit.W4A16)
print(lowbit.evaluate_tasks(q, ["lastword", "nextsent"]))                  # lowbit's own scoring
print(lowbit.evaluate_tasks(q, ["lastword", "nextsent"], harness=True))    # the same items through lm-eval
print(lowbit.evaluate_tasks(q, ["hellaswag"], harness=True, limit=200))    # lm-eval's tasks (hub access)
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lowbit.errors import LowbitError
from lowbit.eval.bootstrap import Estimate, Units, estimate, format_estimate
from lowbit.eval.scoring import DEFAULT_BATCH_TOKENS, evaluate_task
from lowbit.eval.tasks import resolve_task

ACCURACY_METRICS = ("acc", "acc_norm", "exact_match")


@dataclass
class TaskScores:
    """One task's metrics, per-item outcomes and a bootstrap interval per accuracy metric."""

    task: str
    items: int
    metrics: dict[str, float]
    per_item: dict[str, list[float]] = field(default_factory=dict, repr=False)
    intervals: dict[str, Estimate] = field(default_factory=dict)
    via: str = "native"

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "items": self.items, "via": self.via, **self.metrics,
                "intervals": {k: e.to_dict() for k, e in self.intervals.items()}}

    def __str__(self) -> str:
        parts = [f"{m} {format_estimate(self.intervals[m])}" if m in self.intervals else f"{m} {v:.4g}"
                 for m, v in self.metrics.items()]
        return f"{self.task} ({self.items} items, {self.via}): " + ", ".join(parts)


def _with_intervals(name: str, metrics: dict[str, float], per_item: dict[str, list[float]], via: str) -> TaskScores:
    intervals = {m: estimate(Units.of(per_item[m])) for m in ACCURACY_METRICS if per_item.get(m)}
    items = max((len(v) for v in per_item.values()), default=0)
    return TaskScores(name, items, metrics, per_item, intervals, via)


def evaluate_tasks(model: nn.Module, tasks: list[str], tokenizer: Any = None, harness: bool = False,
                   text: str = "pydoc-eval", items: int | None = None, limit: int | None = None,
                   num_fewshot: int | None = None, include_path: list[str] = (),
                   batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = True) -> dict[str, TaskScores]:
    """Accuracy of ``model`` on each task, with 95 % bootstrap intervals over items.

    ``tasks``: ``lastword`` / ``nextsent`` (built from ``text``, ``items`` of them at most), JSONL
    task files, and with ``harness=True`` also lm-eval's own tasks or YAML task files (``limit``
    items each, ``num_fewshot`` examples; lm-eval must be installed: ``pip install 'lowbit[eval]'``).
    """
    if not tasks:
        raise LowbitError("no task given; pass task names such as lastword, nextsent.")
    if tokenizer is None:
        from lowbit.api import load_tokenizer

        tokenizer = load_tokenizer(None)
    if harness:
        try:
            from lowbit.eval.harness import run_tasks
        except ImportError as err:
            raise LowbitError("the lm-eval bridge needs lm-eval 0.4: pip install 'lowbit[eval]' "
                              f"(import failed: {err}).") from err
        result = run_tasks(model, tokenizer, list(tasks), text, items, limit, num_fewshot, list(include_path),
                           batch_tokens, progress)
        return {name: _with_intervals(name, result.metrics[name], result.per_item.get(name, {}), "lm-eval")
                for name in result.metrics}
    if limit is not None or num_fewshot is not None or include_path:
        raise LowbitError("--limit, --num-fewshot and --include-path are lm-eval's: add --harness.")
    out = {}
    for spec in tasks:
        task = resolve_task(spec, text, items)
        scored = evaluate_task(model, tokenizer, task, batch_tokens, progress)
        per_item = {"acc": [float(c) for c in scored.correct]}
        if scored.correct_norm:
            per_item["acc_norm"] = [float(c) for c in scored.correct_norm]
        out[task.name] = _with_intervals(task.name, scored.metrics(), per_item, "native")
    return out
