"""The lm-evaluation-harness bridge: any model lowbit loads or quantises, as an lm-eval 0.4 ``LM``.

lm-eval (Gao et al., EleutherAI, "A framework for few-shot language model evaluation")
is optional: ``pip install 'lowbit[eval]'``. This module imports it; the rest of lowbit
imports this module only when a harness run is asked for.

- `LowbitLM` implements ``loglikelihood`` (with `lowbit.eval.scoring.loglikelihoods`, the
  same core as lowbit's native task scoring), ``loglikelihood_rolling`` (lm-eval's rolling
  disjoint windows) and ``generate_until`` (greedy). It is registered with lm-eval as
  ``lowbit``, so ``simple_evaluate(model="lowbit", model_args="path=DIR")`` works once this
  module is imported.
- `run_tasks` runs tasks by name: lowbit's offline tasks (``lastword``, ``nextsent``,
  generated from a text) and JSONL task files are written as JSONL beside a YAML task
  definition (from the templates in ``lm_eval_tasks/``) in a work directory that lm-eval
  reads with ``include_path``; any other name is one of lm-eval's own tasks (HellaSwag, ARC,
  PIQA, …, which fetch their data from the Hugging Face hub), or a YAML file.
"""

from __future__ import annotations

import difflib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.eval.scoring import (DEFAULT_BATCH_TOKENS, loglikelihoods, max_length, model_device,
                                 prefix_token, score_token_pairs)
from lowbit.eval.tasks import BUILTIN_TASKS, Task, check_yaml, resolve_task, write_task_dir

@register_model("lowbit")
class LowbitLM(LM):
    """A lowbit model (float, quantised with any scheme, on any kernel path) seen by lm-eval."""

    def __init__(self, model: nn.Module | str | None = None, tokenizer: Any = None, path: str | None = None,
                 batch_tokens: int | str = DEFAULT_BATCH_TOKENS, max_gen_toks: int | str = 256,
                 progress: bool = True, **_ignored: Any) -> None:
        super().__init__()
        from lowbit.api import load_model, load_tokenizer

        source = path if model is None else model
        if source is None or isinstance(source, str):
            self.model, self.tokenizer = load_model(source), tokenizer or load_tokenizer(source)
        else:
            self.model, self.tokenizer = source, tokenizer or load_tokenizer(None)
        self.model.eval()
        self.batch_tokens, self.max_gen_toks, self.progress = int(batch_tokens), int(max_gen_toks), progress
        self._device = model_device(self.model)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "lowbit")).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(request.args) for request in requests]
        return loglikelihoods(self.model, self.tokenizer, pairs, self.batch_tokens,
                              self.progress and not disable_tqdm, desc="lm-eval loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        limit, prefix = max_length(self.model), prefix_token(self.tokenizer)
        pairs, owner = [], []
        for r, request in enumerate(requests):
            ids = list(self.tokenizer(request.args[0], add_special_tokens=False)["input_ids"])
            for window in get_rolling_token_windows(ids, prefix, limit, context_len=1):
                pairs.append(make_disjoint_window(window))
                owner.append(r)
        scores = score_token_pairs(self.model, pairs, self.batch_tokens, self.progress and not disable_tqdm,
                                   desc="lm-eval rolling")
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owner, scores):
            totals[r] += logprob
        return totals

    @torch.inference_mode()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in tqdm(requests, desc="lm-eval generate", leave=False,
                            disable=None if self.progress and not disable_tqdm else True):
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            ids = (list(self.tokenizer(context, add_special_tokens=False)["input_ids"])
                   or [prefix_token(self.tokenizer)])
            ids = ids[-(max_length(self.model) - new):]
            generated = self.model.generate(torch.tensor([ids], device=self._device), max_new_tokens=new,
                                            do_sample=False, pad_token_id=prefix_token(self.tokenizer))
            text = self.tokenizer.decode(generated[0, len(ids):], skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0] if stop else text
            out.append(text)
        return out


@dataclass
class HarnessResult:
    """lm-eval's metrics per task, and each task's per-item outcomes (for bootstrap intervals)."""

    metrics: dict[str, dict[str, float]]
    per_item: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def run_tasks(model: nn.Module, tokenizer: Any, specs: list[str], text_source: str = "pydoc-eval",
              items: int | None = None, limit: int | None = None, num_fewshot: int | None = None,
              include_path: list[str] = (), batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = True,
              workdir: str | Path | None = None) -> HarnessResult:
    """Run ``specs`` through lm-eval's ``simple_evaluate`` on ``model``; see the module docstring."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="lowbit-tasks-") as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        local: list[Task] = []
        names: list[str] = []
        for spec in specs:
            if spec in BUILTIN_TASKS or spec.endswith(".jsonl"):
                local.append(resolve_task(spec, text_source, items))
            elif spec.endswith((".yaml", ".yml")):
                check_yaml(Path(spec))
                names.append(spec)
            else:
                names.append(spec)
        lowbit_names = write_task_dir(local, root)
        for path in include_path:
            for yaml_file in sorted(Path(path).glob("**/*.y*ml")):
                check_yaml(yaml_file)
        needs_defaults = any(not n.endswith((".yaml", ".yml")) for n in names)
        manager = TaskManager(include_path=[str(root), *include_path], include_defaults=needs_defaults)
        unknown = [n for n in names if not n.endswith((".yaml", ".yml")) and n not in manager.all_tasks]
        if unknown:
            close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=8)
            raise LowbitError(f"unknown task {unknown[0]!r}; available: {', '.join(BUILTIN_TASKS)}, a JSONL task "
                              f"file, or one of lm-eval's {len(manager.all_tasks)} tasks"
                              + (f" (closest: {', '.join(close)})" if close else "")
                              + "; 'lowbit tasks --harness' lists them all.")
        lm = LowbitLM(model, tokenizer, batch_tokens=batch_tokens, progress=progress)
        raw = simple_evaluate(model=lm, tasks=[*lowbit_names.values(), *names], task_manager=manager, limit=limit,
                              num_fewshot=num_fewshot, bootstrap_iters=0, log_samples=True,
                              random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    if raw is None:
        raise LowbitError("lm-eval returned no results (not the main process?).")
    metrics, per_item = {}, {}
    for name, values in raw["results"].items():
        metrics[name] = {key.split(",")[0]: float(v) for key, v in values.items()
                         if "," in key and "_stderr" not in key and isinstance(v, (int, float))}
    for name, samples in raw.get("samples", {}).items():
        ordered = sorted(samples, key=lambda s: s["doc_id"])
        per_item[name] = {metric: [float(s[metric]) for s in ordered] for metric in metrics.get(name, {})
                          if ordered and isinstance(ordered[0].get(metric), (int, float, bool))}
    rename = {v: k for k, v in lowbit_names.items()}
    return HarnessResult({rename.get(k, k): v for k, v in metrics.items()},
                         {rename.get(k, k): v for k, v in per_item.items()}, raw)
