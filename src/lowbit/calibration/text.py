"""Text sources and the seeded calibration sampler of PROTOCOL.md.

Named sources: ``pydoc-calib`` and ``pydoc-eval`` split the English prose that ships
with every CPython (``pydoc_data.topics``): sort the topic keys, topic i is EVAL when
``i % 5 == 0`` and CALIB otherwise, each split joined with blank lines. Two sources of
other domains, to check for overfitting to the calibration text: ``python-license``
(CPython's LICENSE.txt, legal prose) and ``stdlib-code`` (the source of a few standard
modules). ``stdlib-calib`` is code to calibrate on: the source of other standard modules
than stdlib-code's, so no evaluation text is calibrated on. Anything else is a path: a
text file, a JSONL file with a ``text`` field per line, or a directory written
by ``datasets.Dataset.save_to_disk`` with a ``text`` column (needs ``datasets``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from lowbit.errors import LowbitError

PYDOC_SOURCES = ("pydoc-calib", "pydoc-eval")
# Text of other domains than the calibration prose, also shipped with every CPython: for
# checking that a calibrated method has not overfitted its calibration text.
STDLIB_CODE_MODULES = ("argparse", "difflib", "textwrap", "fractions", "statistics")
OTHER_SOURCES = ("python-license", "stdlib-code")
# Calibration code, disjoint from STDLIB_CODE_MODULES: about 105 k tokens, like pydoc-calib's 96 k.
STDLIB_CALIB_MODULES = ("inspect", "dataclasses", "functools", "pathlib", "enum", "configparser", "random")
NAMED_SOURCES = PYDOC_SOURCES + OTHER_SOURCES + ("stdlib-calib",)


def python_license() -> str:
    """CPython's LICENSE.txt: the history of the software and its licence agreements (legal prose)."""
    import sysconfig

    path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if not path.is_file():
        raise LowbitError(f"this Python has no {path}; pass a text file instead of 'python-license'.")
    return path.read_text(encoding="utf-8")


def stdlib_code(modules: tuple[str, ...] = STDLIB_CODE_MODULES) -> str:
    """The Python source of a few pure-Python standard modules, joined with blank lines (code)."""
    import importlib

    return "\n\n".join(Path(importlib.import_module(name).__file__).read_text(encoding="utf-8")  # type: ignore[arg-type]
                        for name in modules)


def pydoc_split(split: str) -> str:
    """The ``calib`` or ``eval`` half of CPython's pydoc topics, joined with blank lines."""
    from pydoc_data.topics import topics

    if split not in ("calib", "eval"):
        raise LowbitError(f"pydoc split must be 'calib' or 'eval', got {split!r}.")
    keys = sorted(topics)
    chosen = [topics[k] for i, k in enumerate(keys) if (i % 5 == 0) == (split == "eval")]
    return "\n\n".join(chosen)


def _read_jsonl(path: Path) -> str:
    texts = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise LowbitError(f"line {number} of '{path}' is not valid JSON ({err.msg}).") from err
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise LowbitError(f"line {number} of '{path}' has no string 'text' field.")
            texts.append(record["text"])
    return "\n\n".join(texts)


def _read_dataset_dir(path: Path) -> str:
    try:
        import datasets
    except ImportError as err:
        raise LowbitError(f"'{path}' looks like a saved datasets dataset; install 'datasets' to read it.") from err
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        data = data["train"] if "train" in data else next(iter(data.values()))
    if "text" not in data.column_names:
        raise LowbitError(f"dataset '{path}' has no 'text' column (columns: {', '.join(data.column_names)}).")
    return "\n\n".join(t for t in data["text"] if t)


def load_text(source: str) -> str:
    """The text of a named source or a file, refusing missing, unreadable or empty ones."""
    if source == "pydoc-calib":
        return pydoc_split("calib")
    if source == "pydoc-eval":
        return pydoc_split("eval")
    if source == "python-license":
        return python_license()
    if source == "stdlib-code":
        return stdlib_code()
    if source == "stdlib-calib":
        return stdlib_code(STDLIB_CALIB_MODULES)
    path = Path(source)
    if not path.exists():
        raise LowbitError(f"text source '{source}' is not one of {', '.join(NAMED_SOURCES)} and not an existing file.")
    if path.is_dir():
        text = _read_dataset_dir(path)
    else:
        try:
            text = _read_jsonl(path) if path.suffix.lower() == ".jsonl" else path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise LowbitError(f"text file '{path}' is not UTF-8 text.") from err
    if not text.strip():
        raise LowbitError(f"text file '{path}' is empty.")
    return text


def tokenize(tokenizer, text: str) -> Tensor:
    """Token ids of ``text`` without special tokens, (N,) int64."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_set(source: str | Sequence[str] = "pydoc-calib", n: int = 128, seqlen: int = 512, tokenizer=None,
                    seed: int = 0) -> Tensor:
    """``n`` sequences of ``seqlen`` tokens at offsets drawn by ``random.Random(seed)``, (n, seqlen).

    Offsets are uniform over the valid starts ``0 .. len(stream) - seqlen``. Several
    sources make a mix: each gives an equal share of the ``n`` sequences (the first ones
    one more when ``n`` does not divide), drawn from its own stream with its own
    ``random.Random(seed)``, in the order given. Without a tokenizer the default model's
    is used.
    """
    sources = [source] if isinstance(source, str) else list(source)
    if n <= 0 or seqlen <= 0:
        raise LowbitError(f"calibration needs a positive number of sequences and length, got n={n}, seqlen={seqlen}.")
    if not sources or n < len(sources):
        raise LowbitError(f"calibration needs between 1 and n={n} text sources, got {len(sources)}.")
    if tokenizer is None:
        from lowbit.models import load_pretrained_tokenizer

        tokenizer = load_pretrained_tokenizer(None)
    parts = []
    for i, name in enumerate(sources):
        stream = tokenize(tokenizer, load_text(name))
        if stream.numel() < seqlen:
            raise LowbitError(f"text source '{name}' has {stream.numel()} tokens, "
                              f"fewer than one {seqlen}-token sequence.")
        rng = random.Random(seed)
        starts = [rng.randint(0, stream.numel() - seqlen) for _ in range(n // len(sources) + (i < n % len(sources)))]
        parts += [stream[s : s + seqlen] for s in starts]
    return torch.stack(parts)
