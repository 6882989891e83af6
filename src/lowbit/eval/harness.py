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
- `task_manager` is lm-eval's ``TaskManager`` with its own tasks' index read from lowbit's cache
  (`indexed_once`): building it parses every task's YAML file, 15.6 s for lm-eval 0.4.13's
  14 683 tasks on this project's machine (2026-11-29), on every run that names one of them.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.metadata
import logging
import os
import pickle
import tempfile
from collections.abc import Iterator
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
from lowbit.models.loading import cache_root

log = logging.getLogger(__name__)

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


def _tasks_fingerprint(root: Path) -> str:
    """lm-eval's version, the directory, and every YAML file under it by name, size and modification time (a
    walk of ~14 000 files: 0.2 s), so that an edited, added or removed task file makes a new index."""
    try:
        version = importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:  # a source checkout on the path: the files decide alone
        version = "?"
    digest = hashlib.sha256(f"{version}|{root}".encode())
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".yaml"):
                stat = os.stat(os.path.join(directory, name))
                digest.update(f"{directory}/{name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:24]


def _cached_index(root: Path, build) -> dict:
    """lm-eval's index of ``root`` (its own tasks directory): read from lowbit's cache where it has this
    fingerprint, else built and written there."""
    from lowbit.io import atomic_file

    path = cache_root() / "lm-eval" / f"task-index-{_tasks_fingerprint(root)}.pickle"
    try:
        index = pickle.loads(path.read_bytes())
        if isinstance(index, dict):
            with contextlib.suppress(OSError):  # a read-only cache is still read
                os.utime(path)  # used: kept by `_prune_indexes`
            return index
    except FileNotFoundError:
        pass
    except Exception as err:  # a cut or foreign file: build it again
        log.debug("ignoring the task index at %s (%s)", path, err)
    log.info("indexing lm-eval's tasks (once, cached at %s)", path)
    index = build([root])
    try:
        with atomic_file(path, overwrite=True) as tmp:
            tmp.write_bytes(pickle.dumps(index, protocol=pickle.HIGHEST_PROTOCOL))
        _prune_indexes(path.parent)
    except OSError as err:
        log.warning("could not write lm-eval's task index to %s (%s); indexing on each run", path, err)
    return index


KEPT_INDEXES = 4  # task indexes kept in the cache (one per lm-eval install and version), the most recently used


def _prune_indexes(directory: Path) -> None:
    """Remove all but the `KEPT_INDEXES` most recently used task indexes (15 MB each for lm-eval 0.4.13): every
    new environment or lm-eval version writes its own."""
    def used(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:  # removed meanwhile by another process
            return 0.0

    for old in sorted(directory.glob("task-index-*.pickle"), key=used, reverse=True)[KEPT_INDEXES:]:
        with contextlib.suppress(OSError):
            old.unlink()


@contextlib.contextmanager
def indexed_once() -> Iterator[None]:
    """Within the block, lm-eval's ``TaskIndex.build`` reads the index of lm-eval's own tasks directory from
    lowbit's cache (`_cached_index`) and builds any other directory as before, merging them in the order given,
    a later directory's task replacing an earlier one's of the same name as lm-eval's own merge does. Put back
    when the block ends. Not for concurrent use from threads."""
    import lm_eval.tasks
    from lm_eval.tasks import _index

    original = _index.TaskIndex.__dict__["build"]
    build = original.__func__
    defaults = Path(lm_eval.tasks.__file__).parent.resolve()

    def cached_build(paths, *, resolve_includes=True):
        index: dict = {}
        for root in paths:
            own = resolve_includes and Path(root).resolve() == defaults
            part = _cached_index(defaults, build) if own else build([root], resolve_includes=resolve_includes)
            for name, entry in part.items():
                if name in index:
                    log.warning("lm-eval task '%s' from %s overrides the one from %s", name, entry.yaml_path,
                                index[name].yaml_path)
                index[name] = entry
        return index

    _index.TaskIndex.build = staticmethod(cached_build)
    try:
        yield
    finally:
        _index.TaskIndex.build = original


def task_manager(include_path: list[str] | None = None, include_defaults: bool = True):  # -> lm_eval TaskManager
    """lm-eval's ``TaskManager`` over its own tasks (``include_defaults``) and ``include_path``, with the index of
    its own tasks from lowbit's cache (`indexed_once`)."""
    from lm_eval.tasks import TaskManager

    with indexed_once():
        return TaskManager(include_path=include_path, include_defaults=include_defaults)


def run_tasks(model: nn.Module, tokenizer: Any, specs: list[str], text_source: str = "pydoc-eval",
              items: int | None = None, limit: int | None = None, num_fewshot: int | None = None,
              include_path: list[str] = (), batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = True,
              workdir: str | Path | None = None) -> HarnessResult:
    """Run ``specs`` through lm-eval's ``simple_evaluate`` on ``model``; see the module docstring."""
    from lm_eval import simple_evaluate

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
        manager = task_manager([str(root), *include_path], needs_defaults)
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
