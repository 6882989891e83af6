"""Shared fixtures: the real default model, loaded once per test session."""

import pytest


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
