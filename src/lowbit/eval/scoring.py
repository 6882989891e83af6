"""Log-likelihood scoring of continuations, and lowbit's own (native) evaluation of task items.

`loglikelihoods` is the one core both paths use: the native `evaluate_task` and the lm-eval
bridge (`lowbit.eval.harness.LowbitLM.loglikelihood`). It follows lm-eval's conventions for
a causal model, so that its numbers and lm-eval's Hugging Face model's agree:

- a (context, continuation) pair is tokenised as ``context + continuation`` and split where
  the context's own tokens end, trailing spaces of the context moving to the continuation;
  an empty context is replaced by the beginning-of-text token (else end-of-text);
- the model sees ``(context + continuation)[:-1]`` (the last ``max_length`` tokens) and the
  continuation's log-likelihood is the sum of its tokens' log-probabilities; it is *greedy*
  when every continuation token is the argmax at its position.

Requests are sorted (longest first, ties by their tokens) and packed into right-padded
batches of about ``batch_tokens`` tokens; the same set of requests therefore gives the same
batches, and so the same floats, whoever asks. Right padding needs no attention mask: a
causal model's real positions never attend to the padding after them.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.eval.tasks import Task

DEFAULT_BATCH_TOKENS = 2048


def model_device(model: nn.Module) -> torch.device:
    return next(iter(model.buffers()), next(model.parameters())).device


def max_length(model: nn.Module, default: int = 2048) -> int:
    """Context length the model was trained for (its config's ``max_position_embeddings``)."""
    return int(getattr(getattr(model, "config", None), "max_position_embeddings", None) or default)


def prefix_token(tokenizer) -> int:
    """What an empty context becomes: the beginning-of-text token, else end-of-text (lm-eval's HF model's rule)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise LowbitError("the tokenizer has neither an end-of-text nor a beginning-of-text token to stand for an "
                          "empty context.")
    return int(token)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as lm-eval splits them for a causal model."""
    if not context:
        return [prefix_token(tokenizer)], _encode(tokenizer, continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context)
    return whole[: len(context_ids)], whole[len(context_ids):]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices sorted longest first, cut into batches whose padded size stays within batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _supports_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.inference_mode()
def score_token_pairs(model: nn.Module, pairs: list[tuple[list[int], list[int]]],
                      batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = True,
                      desc: str = "scoring") -> list[tuple[float, bool]]:
    """(sum of log-probabilities, greedy?) of each tokenised continuation after its context."""
    for _, continuation in pairs:
        if not continuation:
            raise LowbitError("a continuation to score has no tokens.")
    with tqdm(total=len(pairs), desc=desc, unit="request", leave=False, disable=None if progress else True) as bar:
        return _score_sequences(model, pairs, batch_tokens, bar)


def _score(logits: Tensor, target: list[int]) -> tuple[float, bool]:
    """Summed log-probability of ``target`` (S,) under ``logits`` (S, V), and whether each is the argmax."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(target)
    return float(logprobs.gather(-1, ids[:, None]).sum()), bool((logprobs.argmax(-1) == ids).all())


def _score_sequences(model: nn.Module, pairs: list[tuple[list[int], list[int]]], batch_tokens: int,
                     bar) -> list[tuple[float, bool]]:
    limit = max_length(model)
    inputs, targets = [], []
    for context, continuation in pairs:
        whole = (context + continuation)[-(limit + 1):]
        inputs.append(whole[:-1])
        targets.append(continuation[-limit:])
    # ties in length broken by the tokens, so that the order (and the batches) depend on the set only
    order = sorted(range(len(pairs)), key=lambda i: (-len(inputs[i]), inputs[i], targets[i]))
    device = model_device(model)
    keep = _supports_logits_to_keep(model)
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for batch in _batches([len(inputs[i]) for i in order], batch_tokens):
        rows = [order[b] for b in batch]
        width = len(inputs[rows[0]])
        ids = torch.zeros(len(rows), width, dtype=torch.long)  # (B, L), right-padded with token 0
        for row, i in enumerate(rows):
            ids[row, : len(inputs[i])] = torch.tensor(inputs[i])
        first = min(len(inputs[i]) - len(targets[i]) for i in rows)  # earliest position predicting a target
        kwargs = {"logits_to_keep": torch.arange(first, width, device=device)} if keep else {}
        logits = model(input_ids=ids.to(device), use_cache=False, **kwargs).logits.cpu()  # (B, L', V)
        offset = first if keep else 0
        for row, i in enumerate(rows):
            end = len(inputs[i])
            out[i] = _score(logits[row, end - len(targets[i]) - offset : end - offset], targets[i])
        bar.update(len(rows))
    return out


def loglikelihoods(model: nn.Module, tokenizer, requests: list[tuple[str, str]],
                   batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = True,
                   desc: str = "scoring") -> list[tuple[float, bool]]:
    """(log-likelihood, greedy?) of each (context, continuation) text pair; see the module docstring."""
    pairs = [encode_pair(tokenizer, context, continuation) for context, continuation in requests]
    return score_token_pairs(model, pairs, batch_tokens, progress, desc)


@dataclass
class TaskResult:
    """Per-item outcomes of one model on one task, and the task's metrics (lm-eval's names)."""

    task: str
    kind: str
    correct: list[int]  # acc per item: greedy match (lastword), argmax of log-likelihoods (choice)
    correct_norm: list[int] = field(default_factory=list)  # acc_norm per item (choice tasks)
    loglikelihood: list[float] = field(default_factory=list)  # of the target / the right choice

    @property
    def items(self) -> int:
        return len(self.correct)

    def metrics(self) -> dict[str, float]:
        out = {"acc": sum(self.correct) / self.items}
        if self.kind == "choice":
            out["acc_norm"] = sum(self.correct_norm) / self.items
        else:  # lm-eval's perplexity of a loglikelihood task: exp of minus the mean per-item log-likelihood
            out["perplexity"] = math.exp(-sum(self.loglikelihood) / self.items)
        return out

    def to_dict(self) -> dict:
        return {"task": self.task, "kind": self.kind, "items": self.items, **self.metrics()}


def task_result(task: Task, scores: list[tuple[float, bool]]) -> TaskResult:
    """Per-item outcomes from the scores of every (item, choice) request, in item-then-choice order."""
    result = TaskResult(task.name, task.kind, [])
    position = 0
    for item in task.items:
        lls = [score[0] for score in scores[position : position + len(item.choices)]]
        greedy = scores[position][1]
        position += len(item.choices)
        if task.kind == "lastword":
            result.correct.append(int(greedy))
        else:
            per_char = [ll / len(choice) for ll, choice in zip(lls, item.choices)]
            result.correct.append(int(max(range(len(lls)), key=lambda k: (lls[k], -k)) == item.label))
            result.correct_norm.append(int(max(range(len(lls)), key=lambda k: (per_char[k], -k)) == item.label))
        result.loglikelihood.append(lls[item.label])
    return result


def evaluate_task(model: nn.Module, tokenizer, task: Task, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                  progress: bool = True) -> TaskResult:
    """Score every item of ``task`` natively (no lm-eval needed)."""
    requests = [(item.context, continuation) for item in task.items for continuation in item.continuations()]
    return task_result(task, loglikelihoods(model, tokenizer, requests, batch_tokens, progress, desc=task.name))
