"""Shared fixtures: the real default model, loaded once per test session."""

import os

import pytest

# Triton decides between compiler and interpreter from this variable, and some of that decision is
# taken when triton is first imported — which other packages (compressed-tensors, transformers) may
# do while their tests are collected, before tests/kernels/test_triton.py could set it. So it is set
# here, first; TRITON_INTERPRET=0 in the environment still runs the kernel tests on a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def default_model():
    import lowbit

    return lowbit.load_model()


@pytest.fixture(scope="session")
def default_tokenizer():
    import lowbit

    return lowbit.load_tokenizer()


@pytest.fixture(scope="session")
def eval_tokens(default_tokenizer):
    from lowbit.calibration import load_text, tokenize

    return tokenize(default_tokenizer, load_text("pydoc-eval"))


@pytest.fixture(scope="session")
def first_layers(default_model):
    """``first_layers(n)``: a copy of the default model cut to its first ``n`` decoder layers (for fast
    end-to-end tests)."""
    import copy

    def cut(n: int):
        model = copy.deepcopy(default_model)
        model.model.layers = model.model.layers[:n]
        model.config.num_hidden_layers = n
        return model

    return cut
