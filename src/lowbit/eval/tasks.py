"""Downstream tasks that need no hub: built from any prose, read from and written to JSONL.

Two kinds of item, both scored by log-likelihood (see `lowbit.eval.scoring`):

- ``lastword`` — in the style of LAMBADA (Paperno et al. 2016, arXiv 1606.06031): a
  passage of consecutive sentences with its final word taken off; the item is right when
  greedy decoding of the context would produce exactly that word (lm-eval's ``acc`` of a
  ``loglikelihood`` task), and the word's log-likelihood gives a perplexity.
- ``nextsent`` — four-way "which sentence comes next" (the format of SWAG / HellaSwag,
  Zellers et al. 2018, 2019): two or three consecutive sentences as context, the sentence
  that follows them in the text, and three distractor sentences of similar length taken
  from other runs of the text. ``acc`` is the argmax of the summed log-likelihoods, ``acc_norm``
  the argmax of the log-likelihood per character of each choice (lm-eval's definition).

Items are generated deterministically from a text (``pydoc-eval`` by default, or any
`lowbit.calibration.load_text` source): the text is cut into runs of consecutive prose
sentences (blank-line-separated blocks that read as sentences; a heading, code, a grammar
rule or a table ends a run); every qualifying sentence gives an item, and ``n`` of them are
drawn (and distractors chosen and placed) by ``random.Random(seed)``.

JSONL, one item per line: ``{"context": ..., "target": ...}`` for a lastword item,
``{"context": ..., "choices": [...], "label": i}`` for a multiple-choice one (any number
of choices ≥ 2). The continuation scored is ``" " + target`` / ``" " + choice``.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from lowbit.errors import LowbitError

BUILTIN_TASKS = ("lastword", "nextsent")
TARGET_DELIMITER = " "  # between context and continuation, as lm-eval's target_delimiter
ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "Mr.", "Dr.", "No.")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(*])")
_RULE = re.compile(r"^\s*([*=\-+~^])\1{2,}\s*$")  # heading underlines and table borders
_CODEY = re.compile(r">>>|::=|^\s*[|+]|\s{3,}")


@dataclass(frozen=True)
class TaskItem:
    """One item: the context, the candidate continuations (one for lastword) and the right one's index."""

    context: str
    choices: tuple[str, ...]
    label: int = 0

    def continuations(self) -> list[str]:
        return [TARGET_DELIMITER + c for c in self.choices]


@dataclass(frozen=True)
class Task:
    """A named list of items of one kind: ``lastword`` (greedy match of one target) or ``choice``."""

    name: str
    kind: str  # "lastword" | "choice"
    items: tuple[TaskItem, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("lastword", "choice"):
            raise LowbitError(f"task kind must be 'lastword' or 'choice', got {self.kind!r}.")
        if not self.items:
            raise LowbitError(f"task {self.name!r} has no items.")


def prose_runs(text: str) -> list[list[str]]:
    """Runs of consecutive prose sentences of ``text`` (whitespace collapsed).

    Blocks are separated by blank lines; a heading, a table, or a block with any sentence that
    does not read as prose (code, a grammar rule) ends the run, so that the sentences of a run
    follow each other in the text with nothing left out between them.
    """
    runs: list[list[str]] = [[]]
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.split("\n") if line.strip()]
        sentences = _block_sentences(lines) if lines else None
        if sentences is None:
            runs.append([])
        else:
            runs[-1].extend(sentences)
    return [run for run in runs if run]


def _block_sentences(lines: list[str]) -> list[str] | None:
    """The sentences of a prose block (a bullet's marker dropped), or None when it is not all prose."""
    if any(_RULE.match(line) for line in lines):
        return None  # a heading, or a table
    first = lines[0].lstrip()
    if first.startswith(("* ", "- ", "• ")):
        first = first[2:]
    rest = [line.strip() for line in lines[1:]]
    if len({len(line) - len(line.lstrip()) for line in lines[1:]}) > 1:
        return None  # ragged indentation: code
    sentences = _sentences(" ".join([first.strip(), *rest]))
    return sentences if all(_is_prose(s) for s in sentences) else None


def _sentences(paragraph: str) -> list[str]:
    pieces: list[str] = []
    for piece in _SENTENCE_END.split(paragraph):
        if pieces and pieces[-1].endswith(ABBREVIATIONS):
            pieces[-1] += " " + piece
        else:
            pieces.append(piece)
    return pieces


def _is_prose(sentence: str) -> bool:
    letters = sum(ch.isalpha() for ch in sentence)
    return (len(sentence.split()) >= 5 and sentence[:1].isupper() and sentence.endswith((".", "!", "?"))
            and letters >= 0.7 * len(sentence.replace(" ", "")) and not _CODEY.search(sentence))


def _last_word(sentence: str) -> tuple[str, str] | None:
    """(text before the final word, the word) when the sentence ends in a plain word and a full stop."""
    match = re.fullmatch(r"(.*\S)\s+([A-Za-z]{3,})[.!?]", sentence)
    return (match.group(1), match.group(2)) if match else None


def make_lastword(text: str, n: int | None = None, seed: int = 0, min_words: int = 20,
                  max_words: int = 60) -> list[TaskItem]:
    """LAMBADA-style items: every prose sentence that ends in a plain word (three letters or more)
    and has ``min_words``–``max_words`` words of whole preceding sentences of its run as context
    (as many as fit); ``n`` of them drawn by ``random.Random(seed)``, kept in text order."""
    items = []
    for run in prose_runs(text):
        for j, sentence in enumerate(run):
            cut = _last_word(sentence)
            if cut is None:
                continue
            context, start = cut[0], j
            while start > 0 and len((run[start - 1] + " " + context).split()) <= max_words:
                start -= 1
                context = run[start] + " " + context
            if len(context.split()) >= min_words:
                items.append(TaskItem(context, (cut[1],)))
    return _subset(items, n, random.Random(seed))


def make_nextsent(text: str, n: int | None = None, seed: int = 0, choices: int = 4) -> list[TaskItem]:
    """Multiple-choice "which sentence comes next" items: for every sentence j ≥ 2 of a run, the
    context is the (up to three) sentences before it, the right answer sentence j, and the
    ``choices - 1`` distractors are sentences of other runs whose length is within a factor 1.5 of
    the answer's (so that length alone does not give it away), drawn and placed by ``random.Random(seed)``."""
    rng = random.Random(seed)
    runs = prose_runs(text)
    pool = [(r, s) for r, run in enumerate(runs) for s in run]
    items = []
    for r, run in enumerate(runs):
        for j in range(2, len(run)):
            answer = run[j]
            similar = list(dict.fromkeys(s for q, s in pool if q != r and s != answer
                                         and len(answer) / 1.5 <= len(s) <= 1.5 * len(answer)))  # distinct
            if len(similar) < choices - 1:
                continue
            options = [answer, *rng.sample(similar, choices - 1)]
            rng.shuffle(options)
            items.append(TaskItem(" ".join(run[max(0, j - 3):j]), tuple(options), options.index(answer)))
    return _subset(items, n, rng)


def _subset(items: list[TaskItem], n: int | None, rng: random.Random) -> list[TaskItem]:
    """``n`` of the items drawn by ``rng``, kept in text order (all of them when ``n`` is None or larger)."""
    if n is None or n >= len(items):
        return items
    keep = sorted(rng.sample(range(len(items)), n))
    return [items[i] for i in keep]


def builtin_task(name: str, text_source: str = "pydoc-eval", n: int | None = None, seed: int = 0) -> Task:
    """``lastword`` or ``nextsent`` generated from ``text_source`` (a `load_text` source)."""
    from lowbit.calibration import load_text

    if name not in BUILTIN_TASKS:
        raise LowbitError(f"unknown task {name!r}; the built-in tasks are {', '.join(BUILTIN_TASKS)} "
                          "(or pass a JSONL task file).")
    if n is not None and n <= 0:
        raise LowbitError(f"a task needs a positive number of items, got {n}.")
    text = load_text(text_source)
    items = make_lastword(text, n, seed) if name == "lastword" else make_nextsent(text, n, seed)
    if not items:
        raise LowbitError(f"text source '{text_source}' has no prose paragraph to build {name!r} items from.")
    return Task(name, "lastword" if name == "lastword" else "choice", tuple(items), text_source)


def write_jsonl(task: Task, path: str | Path) -> Path:
    """Write the task's items as JSONL (atomically); returns the path."""
    from lowbit.io import atomic_file

    target = Path(path)
    lines = []
    for item in task.items:
        record = ({"context": item.context, "target": item.choices[0]} if task.kind == "lastword"
                  else {"context": item.context, "choices": list(item.choices), "label": item.label})
        lines.append(json.dumps(record, ensure_ascii=False))
    with atomic_file(target, overwrite=True) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def _item_of(record: object, where: str) -> tuple[str, TaskItem]:
    """One JSONL record as (kind, item); a bad record is a LowbitError naming ``where`` (file and line)."""
    if not isinstance(record, dict):
        raise LowbitError(f"{where} is not a JSON object.")
    context = record.get("context")
    if not isinstance(context, str) or not context.strip():
        raise LowbitError(f"{where} has no non-empty string 'context' field.")
    if "target" in record:
        if not isinstance(record["target"], str) or not record["target"].strip():
            raise LowbitError(f"{where}: 'target' must be a non-empty string.")
        return "lastword", TaskItem(context, (record["target"],))
    choices, label = record.get("choices"), record.get("label")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise LowbitError(f"{where} needs either a string 'target' or a list of at least two non-empty string "
                          "'choices'.")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise LowbitError(f"{where}: 'label' must be an integer index into its {len(choices)} choices, "
                          f"got {label!r}.")
    return "choice", TaskItem(context, tuple(choices), label)


def read_jsonl(path: str | Path, name: str | None = None) -> Task:
    """A task from a JSONL file of items; a malformed line is refused naming its number."""
    source = Path(path)
    if not source.is_file():
        raise LowbitError(f"task file '{source}' does not exist.")
    kinds, items = set(), []
    with source.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"line {number} of task file '{source}'"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise LowbitError(f"{where} is not valid JSON ({err.msg} at column {err.colno}).") from err
            kind, item = _item_of(record, where)
            if kinds and kind not in kinds:
                raise LowbitError(f"{where} is a {kind} item but the lines before it are {kinds.pop()} items.")
            kinds.add(kind)
            items.append(item)
    if not items:
        raise LowbitError(f"task file '{source}' holds no items.")
    return Task(name or source.stem, kinds.pop(), tuple(items), str(source))


def resolve_task(spec: str, text_source: str = "pydoc-eval", n: int | None = None, seed: int = 0) -> Task:
    """A built-in task name or a JSONL file path; anything else is refused, listing what is available."""
    if spec in BUILTIN_TASKS:
        return builtin_task(spec, text_source, n, seed)
    if spec.endswith(".jsonl") or Path(spec).is_file():
        task = read_jsonl(spec)
        return task if n is None or n >= len(task.items) else Task(task.name, task.kind, task.items[:n], task.source)
    raise LowbitError(f"unknown task {spec!r}; available: {', '.join(BUILTIN_TASKS)}, or a JSONL task file "
                      "(lm-eval's tasks, e.g. hellaswag, run with --harness).")

# -- for lm-eval: task files it reads (lm-eval itself is not needed to write or check them) --------------

TEMPLATES = {"lastword": "lowbit_lastword.yaml", "choice": "lowbit_choice.yaml"}


def lm_eval_name(task: Task) -> str:
    """The lm-eval task name of a lowbit task: ``lowbit_`` + its name, non-word characters as ``_``."""
    return "lowbit_" + re.sub(r"\W", "_", task.name)


def write_task_dir(tasks: list[Task], directory: str | Path) -> dict[str, str]:
    """Each task as ``NAME.jsonl`` plus an lm-eval YAML reading it (absolute path); {task name: lm-eval name}."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    names = {}
    for task in tasks:
        name = lm_eval_name(task)
        data = write_jsonl(task, root / f"{name}.jsonl").resolve()
        template = resources.files("lowbit.eval").joinpath("lm_eval_tasks", TEMPLATES[task.kind]).read_text()
        config = yaml.safe_load(template)
        config["task"] = name
        config["dataset_kwargs"] = {"data_files": {"test": str(data)}}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        names[task.name] = name
    return names


class _AnyTagLoader(yaml.SafeLoader):
    """Reads lm-eval YAML (``!function`` tags and all) just to check that it parses."""


_AnyTagLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def check_yaml(path: Path) -> None:
    """Refuse a YAML task file that does not parse, naming the line at fault."""
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_AnyTagLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f"line {mark.line + 1} of " if mark is not None else ""
        raise LowbitError(f"{line}task file '{path}' is not valid YAML ({err.problem or err.context}).") from err
    if not isinstance(config, dict) or not (config.get("task") or config.get("group")):
        raise LowbitError(f"task file '{path}' is not an lm-eval task definition (no 'task' or 'group' key).")
