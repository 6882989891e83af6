"""The lm-eval bridge: the same numbers as lowbit's native scoring and as lm-eval's own HF model."""

import json
import os
import re
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from lowbit.cli import cli  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.eval.harness import LowbitLM, run_tasks  # noqa: E402
from lowbit.eval.scoring import evaluate_task  # noqa: E402
from lowbit.eval.tasks import builtin_task  # noqa: E402


@pytest.fixture(scope="module")
def small(first_layers):
    return first_layers(2)


def test_bridge_equals_native_on_the_same_items(small, default_tokenizer, tmp_path):
    for name, n in (("lastword", 16), ("nextsent", 12)):
        task = builtin_task(name, n=n)
        native = evaluate_task(small, default_tokenizer, task, progress=False)
        bridged = run_tasks(small, default_tokenizer, [name], items=n, progress=False, workdir=tmp_path / name)
        assert bridged.metrics[name]["acc"] == native.metrics()["acc"]
        assert bridged.per_item[name]["acc"] == [float(c) for c in native.correct]
        if name == "nextsent":
            assert bridged.metrics[name]["acc_norm"] == native.metrics()["acc_norm"]
            assert bridged.per_item[name]["acc_norm"] == [float(c) for c in native.correct_norm]
            samples = sorted(bridged.raw["samples"]["lowbit_nextsent"], key=lambda s: s["doc_id"])
            lls = [s["resps"][item.label][0][0] for s, item in zip(samples, task.items)]
        else:
            assert bridged.metrics[name]["perplexity"] == native.metrics()["perplexity"]
            lls = bridged.per_item[name]["perplexity"]  # lm-eval keeps each item's log-likelihood there
        assert lls == native.loglikelihood  # the same floats: one scoring core, the same batches
        written = [json.loads(line) for line in (tmp_path / name / f"lowbit_{name}.jsonl").read_text().splitlines()]
        assert len(written) == n and written[0]["context"] == task.items[0].context


def test_bridge_agrees_with_lm_evals_own_hf_model(small, default_tokenizer):
    task = builtin_task("nextsent", n=3)
    requests = [(item.context, c) for item in task.items for c in item.continuations()]
    ours, theirs = LowbitLM(small, default_tokenizer, progress=False), HFLM(pretrained=small, tokenizer=default_tokenizer,
                                                                          batch_size=1, device="cpu")

    def instances(kind, args):
        return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]

    for (a, greedy_a), (b, greedy_b) in zip(ours.loglikelihood(instances("loglikelihood", requests)),
                                            theirs.loglikelihood(instances("loglikelihood", requests))):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4) and greedy_a == greedy_b
    text = [(task.items[0].context,), ("Short.",)]
    assert ours.loglikelihood_rolling(instances("loglikelihood_rolling", text)) == pytest.approx(
        theirs.loglikelihood_rolling(instances("loglikelihood_rolling", text)), rel=1e-5)


def test_generate_until_stops_at_the_stop_string(default_model, default_tokenizer):
    lm = LowbitLM(default_model, default_tokenizer, progress=False)
    requests = [Instance(request_type="generate_until", doc={}, idx=0,
                         arguments=("Monday, Tuesday, Wednesday,", {"until": [")"], "max_gen_toks": 8}))]
    hf = HFLM(pretrained=default_model, tokenizer=default_tokenizer, batch_size=1, device="cpu")
    ours = lm.generate_until(requests)
    assert ours == hf.generate_until(requests) and ours[0].strip() and ")" not in ours[0]


def test_unknown_harness_task_lists_what_there_is(small, default_tokenizer):
    with pytest.raises(LowbitError, match=r"unknown task 'hellaswagg'; available: lastword, nextsent, .*closest: "
                                          r"hellaswag"):
        run_tasks(small, default_tokenizer, ["hellaswagg"], progress=False)


def test_malformed_yaml_task_names_the_line(tmp_path):
    bad = tmp_path / "mytask.yaml"
    bad.write_text("task: mytask\ndataset_path: json\n  output_type: [1,\n")
    result = CliRunner().invoke(cli, ["eval", "default", "--harness", "--tasks", str(bad)])
    assert result.exit_code == 1 and re.search(r"line 3 of task file .*mytask.yaml' is not valid YAML", result.output)


def test_cli_eval_tasks_native_and_harness(tmp_path):
    reports = {}
    for extra in ([], ["--harness"]):
        out = tmp_path / f"r{len(extra)}.json"
        result = CliRunner().invoke(cli, ["eval", "default", "--tasks", "lastword,nextsent", "--task-items", "2",
                                          *extra, "--json", str(out)])
        assert result.exit_code == 0, result.output
        reports[bool(extra)] = report = json.loads(out.read_text())
        assert set(report["tasks"]) == {"lastword", "nextsent"} and "ppl" not in report
        assert report["tasks"]["nextsent"]["via"] == ("lm-eval" if extra else "native")
        interval = report["tasks"]["nextsent"]["intervals"]["acc"]
        assert interval["low"] <= report["tasks"]["nextsent"]["acc"] <= interval["high"]
    for task in ("lastword", "nextsent"):
        assert reports[False]["tasks"][task]["acc"] == reports[True]["tasks"][task]["acc"]


def test_lm_evals_own_task_index_is_cached_and_equal_to_a_fresh_one(tmp_path, monkeypatch):
    """`task_manager` reads the index of lm-eval's own tasks from lowbit's cache, written by the first call: the
    same entries as lm-eval's own TaskManager builds, a user's directory still indexed each time and merged after
    (its task replacing the built-in one of the same name); an edited task file or a cut cache file makes a new
    index. (A copy of three of lm-eval's task folders stands in for its ~14 000 tasks.)"""
    import shutil

    import lm_eval.tasks
    from lm_eval.tasks import TaskManager, _index

    from lowbit.eval import harness

    own = tmp_path / "tasks"
    for name in ("arc", "piqa", "hellaswag"):
        shutil.copytree(Path(lm_eval.tasks.__file__).parent / name, own / name)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "piqa.yaml").write_text((own / "piqa" / "piqa.yaml").read_text().replace("num_fewshot", "# num_fewshot"))
    monkeypatch.setattr(lm_eval.tasks, "__file__", str(own / "__init__.py"))
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    built = []
    plain_build = _index.TaskIndex.__dict__["build"].__func__

    def counting(paths, *, resolve_includes=True):
        built.append([Path(p).name for p in paths])
        return plain_build(paths, resolve_includes=resolve_includes)

    monkeypatch.setattr(_index.TaskIndex, "build", staticmethod(counting))

    def fresh(paths):
        return TaskManager(include_path=paths, include_defaults=False)._index

    expected = fresh([str(own), str(user)])
    assert "piqa" in expected and "arc_easy" in expected and expected["piqa"].yaml_path == user / "piqa.yaml"
    cache = tmp_path / "cache" / "lm-eval"
    cache.mkdir(parents=True)
    for age in range(1, 6):  # other environments' indexes, the oldest last: all but the newest 3 go
        (cache / f"task-index-other{age}.pickle").write_bytes(b"x")
        os.utime(cache / f"task-index-other{age}.pickle", (time.time() - 1000 * age,) * 2)
    built.clear()
    assert harness.task_manager([str(own), str(user)], include_defaults=False)._index == expected
    assert built == [["tasks"], ["mine"]]  # our own tasks' index built (and written) once, the user's as always
    kept = {path.name for path in cache.glob("task-index-*.pickle")}
    assert harness.KEPT_INDEXES == 4 and len(kept) == 4
    assert {name for name in kept if "other" in name} == {f"task-index-other{age}.pickle" for age in (1, 2, 3)}
    assert harness.task_manager([str(own), str(user)], include_defaults=False)._index == expected
    assert built == [["tasks"], ["mine"], ["mine"]]
    assert _index.TaskIndex.__dict__["build"].__func__ is counting  # put back when the block ended

    arc = own / "arc" / "arc_easy.yaml"  # an edited task: a new fingerprint, a new index
    arc.write_text(arc.read_text().replace("task: arc_easy", "task: arc_easy_edited"))
    index = harness.task_manager([str(own)], include_defaults=False)._index
    assert "arc_easy_edited" in index and "arc_easy" not in index and built[-1] == ["tasks"]
    assert index == fresh([str(own)])

    for path in cache.glob("task-index-*.pickle"):
        path.write_bytes(path.read_bytes()[:100])  # cut short: built again, quietly
    count = len(built)
    assert harness.task_manager([str(own)], include_defaults=False)._index == index
    assert len(built) == count + 1
