"""Text sources and the calibration sampler of PROTOCOL.md."""

import json
import random

import pytest
import torch

from lowbit.calibration import calibration_set, load_text, pydoc_split
from lowbit.errors import LowbitError


def test_pydoc_split_follows_the_protocol():
    from pydoc_data.topics import topics

    keys = sorted(topics)
    ev, ca = pydoc_split("eval"), pydoc_split("calib")
    assert ev == "\n\n".join(topics[k] for k in keys[::5])
    assert ca == "\n\n".join(topics[k] for i, k in enumerate(keys) if i % 5)
    assert load_text("pydoc-eval") == ev and load_text("pydoc-calib") == ca
    assert topics[keys[0]] in ev and topics[keys[0]] not in ca
    assert topics[keys[1]] in ca and topics[keys[1]] not in ev


def test_text_file_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world", encoding="utf-8")
    assert load_text(str(tmp_path / "a.txt")) == "hello world"
    lines = [json.dumps({"text": "first"}), "", json.dumps({"text": "second", "id": 2})]
    (tmp_path / "b.jsonl").write_text("\n".join(lines), encoding="utf-8")
    assert load_text(str(tmp_path / "b.jsonl")) == "first\n\nsecond"


@pytest.mark.parametrize(
    "content, name, message",
    [
        ("", "empty.txt", "text file '.*empty.txt' is empty"),
        ("  \n\n ", "blank.txt", "is empty"),
        ('{"text": "ok"}\n{"body": "no"}\n', "bad.jsonl", "line 2 of '.*bad.jsonl' has no string 'text' field"),
        ('{"text": "ok"}\n{oops\n', "broken.jsonl", "line 2 of '.*broken.jsonl' is not valid JSON"),
    ],
)
def test_bad_text_files_are_named(tmp_path, content, name, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(LowbitError, match=message):
        load_text(str(tmp_path / name))


def test_missing_text_source():
    with pytest.raises(LowbitError, match="text source 'nope.txt' is not one of pydoc-calib, pydoc-eval, python-license"):
        load_text("nope.txt")


class _CharTokenizer:
    """One token per character: enough to test the sampler without loading a model."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 1000 for c in text]}


def test_calibration_offsets_are_seeded_uniform_starts():
    tok = _CharTokenizer()
    stream = torch.tensor(tok(pydoc_split("calib"))["input_ids"])
    batch = calibration_set("pydoc-calib", n=5, seqlen=64, tokenizer=tok, seed=0)
    rng = random.Random(0)
    starts = [rng.randint(0, stream.numel() - 64) for _ in range(5)]
    assert batch.shape == (5, 64) and batch.dtype == torch.long
    for row, s in zip(batch, starts):
        assert torch.equal(row, stream[s : s + 64])
    assert torch.equal(batch, calibration_set("pydoc-calib", n=5, seqlen=64, tokenizer=tok, seed=0))
    assert not torch.equal(batch, calibration_set("pydoc-calib", n=5, seqlen=64, tokenizer=tok, seed=1))


def test_calibration_refuses_short_text(tmp_path):
    (tmp_path / "short.txt").write_text("tiny", encoding="utf-8")
    with pytest.raises(LowbitError, match="has 4 tokens, fewer than one 64-token sequence"):
        calibration_set(str(tmp_path / "short.txt"), n=2, seqlen=64, tokenizer=_CharTokenizer())
    with pytest.raises(LowbitError, match="positive number"):
        calibration_set("pydoc-calib", n=0, seqlen=64, tokenizer=_CharTokenizer())


@pytest.mark.parametrize("source,marker,least", [("python-license", "PYTHON SOFTWARE FOUNDATION LICENSE", 10_000),
                                                 ("stdlib-code", "class ArgumentParser", 150_000)])
def test_other_domain_sources_ship_with_python(source, marker, least):
    text = load_text(source)
    assert marker in text and len(text) > least
    assert text not in load_text("pydoc-calib")


def test_calibration_mix_takes_an_equal_share_from_each_source():
    tok = _CharTokenizer()
    mix = calibration_set(["pydoc-calib", "stdlib-calib"], n=5, seqlen=64, tokenizer=tok)
    assert mix.shape == (5, 64)
    assert torch.equal(mix[:3], calibration_set("pydoc-calib", n=3, seqlen=64, tokenizer=tok))  # 3 + 2
    assert torch.equal(mix[3:], calibration_set("stdlib-calib", n=2, seqlen=64, tokenizer=tok))
    assert torch.equal(calibration_set(["pydoc-calib"], n=5, seqlen=64, tokenizer=tok),
                       calibration_set("pydoc-calib", n=5, seqlen=64, tokenizer=tok))
    with pytest.raises(LowbitError, match="between 1 and n=1 text sources"):
        calibration_set(["pydoc-calib", "stdlib-calib"], n=1, seqlen=64, tokenizer=tok)


def test_calibration_code_is_no_evaluation_text():
    from lowbit.calibration.text import STDLIB_CALIB_MODULES, STDLIB_CODE_MODULES

    assert not set(STDLIB_CALIB_MODULES) & set(STDLIB_CODE_MODULES)
    code = load_text("stdlib-calib")
    assert "def signature(" in code and code not in load_text("stdlib-code")
