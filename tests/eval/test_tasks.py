"""Offline downstream tasks: deterministic generation from text, JSONL files, native scoring, bad input."""

import json
import re

import pytest
from click.testing import CliRunner

from lowbit.calibration import load_text
from lowbit.cli import cli
from lowbit.errors import LowbitError
from lowbit.eval.scoring import evaluate_task, loglikelihoods
from lowbit.eval.tasks import (Task, TaskItem, builtin_task, make_lastword, make_nextsent, read_jsonl, resolve_task,
                               write_jsonl)

PROSE = """The river rose slowly through the night.  By morning the lower fields were under water
and the farmers had moved their animals to the hill.

Nobody in the village could remember a flood like it. The old mill, which had stood for two
hundred years, lost its wheel before noon. Children watched from the church steps as the wheel
floated past the bridge and disappeared around the bend.

   >>> print("this block is code")

The council met in the evening to decide what to do next. They agreed to rebuild the mill before
winter. Every family promised a day of work to the project, and the baker promised bread for everyone.
"""


def _flat(text: str) -> str:
    """Whitespace collapsed and list bullets dropped, as the task builder reads the text."""
    return re.sub(r"\s+", " ", re.sub(r"(?m)^\s*[*\-•] ", "", text))


def test_pydoc_tasks_are_deterministic_and_taken_from_the_text():
    text = load_text("pydoc-eval")
    flat = _flat(text)
    lastword, nextsent = make_lastword(text), make_nextsent(text)
    assert make_lastword(text) == lastword and make_nextsent(text) == nextsent
    assert len(lastword) >= 100 and len(nextsent) >= 100
    for item in lastword:
        assert len(item.choices) == 1 and item.choices[0].isalpha()
        assert _flat(item.context + " " + item.choices[0]) in flat  # the word really ends that passage
    for item in nextsent:
        assert len(set(item.choices)) == 4 and 0 <= item.label < 4
        assert _flat(item.context + " " + item.choices[item.label]) in flat  # the answer really comes next
    assert {item.label for item in nextsent} == {0, 1, 2, 3}
    sample = builtin_task("nextsent", n=20, seed=1)
    assert len(sample.items) == 20 and sample.items == builtin_task("nextsent", n=20, seed=1).items


def test_tasks_from_user_text(tmp_path):
    source = tmp_path / "story.txt"
    source.write_text(PROSE)
    lastword = builtin_task("lastword", text_source=str(source))
    assert [i.choices[0] for i in lastword.items] == ["hill", "noon", "bend", "everyone"]  # contexts of 20+ words
    nextsent = make_nextsent(PROSE, choices=2)
    answers = [i.choices[i.label].split()[:2] for i in nextsent]  # sentence j >= 2 of each run
    assert answers == [["Nobody", "in"], ["The", "old"], ["Children", "watched"], ["Every", "family"]]
    assert not any("print" in i.context for i in lastword.items + tuple(nextsent))  # the code block breaks runs


def test_jsonl_round_trip(tmp_path):
    for name in ("lastword", "nextsent"):
        task = builtin_task(name, n=7)
        back = read_jsonl(write_jsonl(task, tmp_path / f"{name}.jsonl"), name=name)
        assert back.items == task.items and back.kind == task.kind


@pytest.mark.parametrize("lines, fault", [
    (['{"context": "a", "target": "b"}', '{"context": "a", "target": "b"', ""], "line 2 of task file .* not valid JSON"),
    (['{"context": "a", "choices": ["x", "y"], "label": 2}'], "line 1 .* 'label' must be an integer index"),
    (['{"context": "a", "target": "b"}', "", '{"context": "a", "choices": ["x", "y"], "label": 0}'],
     "line 3 .* is a choice item but the lines before it are lastword items"),
    (['["context"]'], "line 1 of task file .* is not a JSON object"),
    (['{"context": "", "target": "b"}'], "line 1 .* no non-empty string 'context'"),
])
def test_malformed_task_file_names_the_line(tmp_path, lines, fault):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LowbitError, match=fault):
        read_jsonl(path)
    result = CliRunner().invoke(cli, ["eval", "default", "--tasks", str(path)])
    assert result.exit_code == 1 and re.search(fault, result.output) and "Traceback" not in result.output


def test_unknown_task_lists_the_available_ones():
    with pytest.raises(LowbitError, match="unknown task 'lambada'; available: lastword, nextsent"):
        resolve_task("lambada")
    result = CliRunner().invoke(cli, ["eval", "default", "--tasks", "lastword,lambada"])
    assert result.exit_code == 1 and "available: lastword, nextsent" in result.output


def test_native_scoring_follows_its_definitions(first_layers, default_model, default_tokenizer):
    """acc is the argmax of the summed log-likelihoods, acc_norm of the per-character ones, lastword's acc
    is a greedy match — each checked against loglikelihoods of the requests one by one."""
    model = first_layers(2)
    task = builtin_task("nextsent", n=6)
    result = evaluate_task(model, default_tokenizer, task, progress=False)
    for k, item in enumerate(task.items):
        lls = [loglikelihoods(model, default_tokenizer, [(item.context, c)], progress=False)[0][0]
               for c in item.continuations()]
        assert result.loglikelihood[k] == pytest.approx(lls[item.label], rel=1e-5)
        assert result.correct[k] == int(max(range(4), key=lambda j: lls[j]) == item.label)
        norm = [ll / len(c) for ll, c in zip(lls, item.choices)]
        assert result.correct_norm[k] == int(max(range(4), key=lambda j: norm[j]) == item.label)
    # items whose target the whole model predicts (the days of the week), and one it cannot
    context = "Monday, Tuesday, Wednesday, Thursday,"
    easy = Task("easy", "lastword", (TaskItem(context, ("Friday",)), TaskItem(context, ("zebra",))))
    scored = evaluate_task(default_model, default_tokenizer, easy, progress=False)
    assert scored.correct == [1, 0] and scored.loglikelihood[0] > scored.loglikelihood[1]
    assert json.dumps(scored.to_dict())
