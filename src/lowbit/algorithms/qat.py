"""Quantisation-aware training (QAT): the config and the pure parts of the training step.

The model trains through fake-quantised weights (`lowbit.nn.FakeQuantLinear`: straight-through
rounding, LSQ step sizes, Esser et al., arXiv 1902.08153), and the loss is either the next-token
cross-entropy on the text or — when the original training data is not at hand, which is the usual
case — knowledge distillation from the full-precision model: ``KL(P_teacher ‖ P_student)`` of the
next-token distributions at temperature T, times T² (Hinton et al., arXiv 1503.02531; applied to
quantised LLMs by LLM-QAT, Liu et al., arXiv 2305.17888, and BitDistiller, Du et al., arXiv
2402.10631). Low-rank adapters on a frozen 4-bit base (QLoRA, Dettmers et al., arXiv 2305.14314)
train with the same loop (`lowbit.nn.LoRALinear`).

This file holds what is a function of tensors and numbers: the losses, the learning-rate
schedule, the seeded choice of each step's token windows. The loop with its optimiser,
checkpoints and progress bar is `lowbit.training`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from lowbit.errors import LowbitError
from lowbit.nn.fake_quant import SCALE_GRADS, _check_scale_grad

LOSSES = ("distill", "next-token")
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("auto", "float32", "bfloat16")
TRAINS = ("all", "quant-params")
CHUNK = 1024  # positions per loss chunk: bounds the float32 (positions × vocab) temporaries


@dataclass(frozen=True)
class QAT:
    """How to train: loss, budget, optimiser (AdamW) and schedule.

    Args:
        loss: ``distill`` (KL(teacher ‖ student) against the float model's logits) or ``next-token``.
        steps: optimiser steps; each sees ``batch_size × seqlen × grad_accum`` tokens.
        batch_size: sequences per forward pass (micro-batch).
        seqlen: tokens per sequence.
        grad_accum: micro-batches whose gradients add up to one optimiser step.
        lr: peak learning rate of the latent weights (and LoRA adapters).
        scale_lr: peak learning rate of learned step sizes and zero points.
        scale_grad: the gradient of the step sizes and zero points. ``lsq`` (Esser et al., "Learned Step Size
            Quantization", arXiv 1902.08153): straight-through rounding, ∂ŵ/∂s = round(w/s) − w/s inside the
            range and q − z where clipped, ∂ŵ/∂z = −s where clipped only. ``exact`` (EfficientQAT, Chen et al.,
            arXiv 2407.11062, its E2E-QP stage): ŵ = (q − z)·s with the integer codes q held fixed, so
            ∂ŵ/∂s = q − z and ∂ŵ/∂z = −s for every element — the true derivative while no code changes. From a
            PTQ start (GPTQ, AWQ) the latent weights lie on the grid, where LSQ's round(w/s) − w/s is float
            rounding noise and nothing is clipped: LSQ then gives the scales no signal, and AdamW turns the
            noise into steps of full size in random directions.
        train: ``all`` (latent weights, scales and zero points) or ``quant-params`` (the codes are frozen
            bit for bit, only the scales / zero points — and static activation scales — train; E2E-QP).
        weight_decay: AdamW's decoupled weight decay (weights and adapters only).
        schedule: ``cosine`` or ``linear`` decay to zero after warm-up, or ``constant``.
        warmup: steps of linear warm-up from zero.
        temperature: distillation temperature T.
        max_grad_norm: clip the global gradient norm to this (0 = no clipping).
        checkpoint_every: write a checkpoint every N steps (0 = only at the end), when a directory is given.
        seed: picks each step's windows (``seed`` and the step number alone decide them, so a resumed run
            sees the same data as an uninterrupted one).
        dtype: ``auto`` (bfloat16 autocast where the CPU or GPU multiplies it natively, else float32),
            ``float32`` or ``bfloat16``; the latent weights, optimiser state and losses stay float32.
    """

    loss: Literal["distill", "next-token"] = "distill"
    steps: int = 100
    batch_size: int = 4
    seqlen: int = 256
    grad_accum: int = 1
    lr: float = 1e-4
    scale_lr: float = 1e-3
    scale_grad: Literal["lsq", "exact"] = "exact"
    train: Literal["all", "quant-params"] = "all"
    weight_decay: float = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: int = 0
    temperature: float = 1.0
    max_grad_norm: float = 1.0
    checkpoint_every: int = 0
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"

    name: ClassVar[str] = "qat"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise LowbitError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}.")
        if self.schedule not in SCHEDULES:
            raise LowbitError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}.")
        _check_scale_grad(self.scale_grad)
        if self.train not in TRAINS:
            raise LowbitError(f"train must be one of {', '.join(TRAINS)}, got {self.train!r}.")
        if self.dtype not in DTYPES:
            raise LowbitError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        for field in ("steps", "batch_size", "seqlen", "grad_accum"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise LowbitError(f"{field} must be a positive integer, got {value!r}.")
        for field in ("warmup", "checkpoint_every", "seed"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 0:
                raise LowbitError(f"{field} must be a non-negative integer, got {value!r}.")
        for field in ("lr", "scale_lr", "temperature"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise LowbitError(f"{field} must be a positive finite number, got {value!r}.")
        for field in ("weight_decay", "max_grad_norm"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise LowbitError(f"{field} must be a non-negative finite number, got {value!r}.")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seqlen * self.grad_accum

    def replace(self, **changes: Any) -> QAT:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QAT:
        data = {k: v for k, v in data.items() if k != "name"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise LowbitError(f"unknown QAT field(s): {', '.join(sorted(unknown))}.")
        return cls(**data)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based) of ``total``."""
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def window_starts(n_tokens: int, seqlen: int, count: int, seed: int, step: int) -> list[int]:
    """Start offsets of the ``count`` windows of ``seqlen`` tokens for optimiser step ``step``.

    Uniform over the valid starts, drawn from a generator seeded by (seed, step) alone.
    """
    span = n_tokens - seqlen
    if span < 0:
        raise LowbitError(f"the training text has {n_tokens} tokens, fewer than one sequence of {seqlen}.")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, span + 1, (count,), generator=generator).tolist()


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over positions of ``T² · KL(softmax(t / T) ‖ softmax(s / T))``; logits (..., V), float32 math."""
    if student_logits.shape != teacher_logits.shape:
        raise LowbitError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                          f"{tuple(teacher_logits.shape)} differ in shape.")
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)
    t = teacher_logits.reshape(-1, vocab)
    total = s.new_zeros((), dtype=torch.float32)
    for s_chunk, t_chunk in zip(s.split(CHUNK), t.split(CHUNK)):
        log_q = torch.log_softmax(s_chunk.float() / temperature, dim=-1)
        log_p = torch.log_softmax(t_chunk.float() / temperature, dim=-1)
        total = total + F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    return total * temperature**2 / s.shape[0]


def next_token_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """Mean cross-entropy of ids[:, 1:] under logits[:, :-1]; logits (B, T, V), ids (B, T)."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1))


__all__ = ["LOSSES", "QAT", "SCALE_GRADS", "SCHEDULES", "TRAINS", "distillation_loss", "lr_factor", "next_token_loss",
           "window_starts"]
