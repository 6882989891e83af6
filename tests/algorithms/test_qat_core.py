"""The pure parts of QAT: config validation, learning-rate schedule, seeded windows, the losses."""

import math

import pytest
import torch

from lowbit.algorithms.qat import QAT, distillation_loss, lr_factor, next_token_loss, window_starts
from lowbit.errors import LowbitError


@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "steps must be a positive integer"),
    ({"lr": float("nan")}, "lr must be a positive finite number"),
    ({"scale_lr": -1.0}, "scale_lr must be a positive finite number"),
    ({"loss": "mse"}, "loss must be one of distill, next-token"),
    ({"schedule": "step"}, "schedule must be one of"),
    ({"warmup": -1}, "warmup must be a non-negative integer"),
    ({"max_grad_norm": float("inf")}, "max_grad_norm must be a non-negative finite number"),
])
def test_config_refuses_bad_values(change, message):
    with pytest.raises(LowbitError, match=message):
        QAT(**change)


def test_config_round_trips():
    config = QAT(steps=7, lr=3e-5, schedule="linear", warmup=2, loss="next-token")
    assert QAT.from_dict(config.to_dict()) == config
    with pytest.raises(LowbitError, match="unknown QAT field"):
        QAT.from_dict({**config.to_dict(), "momentum": 0.9})


def test_schedules():
    assert [lr_factor(s, 10, 0, "constant") for s in range(10)] == [1.0] * 10
    assert [lr_factor(s, 4, 0, "linear") for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    cosine = [lr_factor(s, 8, 2, "cosine") for s in range(8)]
    assert cosine[:2] == [1 / 3, 2 / 3] and cosine[2] == 1.0
    assert all(a > b for a, b in zip(cosine[2:], cosine[3:])) and cosine[-1] > 0
    assert lr_factor(6, 8, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 6)))


def test_windows_depend_on_seed_and_step_only():
    a = window_starts(1000, 64, 8, seed=0, step=3)
    assert a == window_starts(1000, 64, 8, seed=0, step=3)
    assert a != window_starts(1000, 64, 8, seed=0, step=4) and a != window_starts(1000, 64, 8, seed=1, step=3)
    assert all(0 <= s <= 1000 - 64 for s in a)
    assert window_starts(64, 64, 2, 0, 0) == [0, 0]
    with pytest.raises(LowbitError, match="fewer than one sequence of 64"):
        window_starts(63, 64, 1, 0, 0)


def test_distillation_loss_is_kl_teacher_to_student():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=generator)
    teacher = torch.randn(2, 5, 11, generator=generator)
    p = teacher.softmax(-1)
    expected = (p * (p.log() - student.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(student, teacher), expected)
    assert distillation_loss(teacher, teacher).abs() < 1e-6
    t = 2.0
    pt = (teacher / t).softmax(-1)
    expected_t = (pt * (pt.log() - (student / t).log_softmax(-1))).sum(-1).mean() * t * t
    torch.testing.assert_close(distillation_loss(student, teacher, t), expected_t)
    with pytest.raises(LowbitError, match="differ in shape"):
        distillation_loss(student, teacher[:, :4])


def test_next_token_loss_predicts_the_following_token():
    logits = torch.full((1, 4, 6), -10.0)
    ids = torch.tensor([[1, 2, 3, 4]])
    for t in range(3):
        logits[0, t, ids[0, t + 1]] = 10.0
    assert next_token_loss(logits, ids) < 1e-6
