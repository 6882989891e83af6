"""lowbit compare: a report with a table, intervals and plots that opens offline (on a cut model, tiny settings)."""

import base64
import io
import json
from html.parser import HTMLParser

import matplotlib.image
import pytest
from click.testing import CliRunner

from lowbit.cli import cli
from lowbit.compare import CompareConfig, compare, merge
from lowbit.errors import LowbitError
from lowbit.compare_plots import pareto_front
from lowbit.compare_report import write_report


class _Page(HTMLParser):
    """The tables (rows of cell texts), images and list items of a page."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.items, self._cell, self._in = [], [], [], None, []

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th", "li"):
            self._cell = ""
        elif tag == "img":
            self.images.append(dict(attrs))

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None
        elif tag == "li":
            self.items.append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _nontrivial_png(data: bytes) -> None:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    pixels = matplotlib.image.imread(io.BytesIO(data), format="png")
    assert pixels.shape[0] >= 300 and pixels.shape[1] >= 500 and pixels[..., :3].std() > 0.05


def test_compare_report_on_a_cut_model(first_layers, default_tokenizer, tmp_path):
    config = CompareConfig(("W4A16", "NF4"), ("rtn", "gptq"), task_items=3, calib_samples=4, calib_seqlen=32,
                           error_samples=2, window=64, max_windows=3, kl_windows=2, decode_prompt=8, decode_new=2)
    data = compare(first_layers(2), default_tokenizer, config, tmp_path, progress=False)
    paths = write_report(data, tmp_path)
    assert json.loads((tmp_path / "compare.json").read_text())["config"] == json.loads(json.dumps(config.to_dict()))

    page = _Page()
    page.feed(paths["html"].read_text())
    header, *rows = page.tables[0]
    for column in ("bits/weight", "weights MB", "ppl pydoc-eval", "KL vs FP (pydoc-eval)", "top-1 vs FP % (pydoc-eval)",
                   "lastword acc %", "nextsent acc_norm %", "quantise s", "decode tok/s", "peak RSS GB"):
        assert column in header
    assert [r[0] for r in rows] == ["FP (float32 compute, bf16 storage)", "W4A16 RTN", "W4A16 GPTQ", "NF4 RTN",
                                    "NF4 GPTQ"]
    assert rows[-1][1].startswith("skipped: GPTQ quantises integer weights")
    for row in rows[1:4]:
        ppl, kl, top1 = (row[header.index(c)] for c in ("ppl pydoc-eval", "KL vs FP (pydoc-eval)",
                                                         "top-1 vs FP % (pydoc-eval)"))
        for cell in (ppl, kl, top1, row[header.index("lastword acc %")]):
            value, interval = cell.split(" [")
            low, high = (float(x) for x in interval.rstrip("]").split(", "))
            assert low <= float(value) <= high  # every figure carries its interval
        assert float(row[header.index("bits/weight")]) > 4 and float(row[header.index("decode tok/s")]) > 0
    pairs = page.tables[1]  # methods within a scheme: W4A16 RTN − GPTQ on every figure, each with its verdict
    assert pairs[0][-1] == "verdict" and len(pairs) > 1
    assert all(row[0] == "W4A16" and row[-1] in ("distinguishable", "not distinguishable") for row in pairs[1:])
    assert any("4 × 32 tokens of pydoc-calib" in item for item in page.items)

    assert len(page.images) == 2
    for image, name in zip(page.images, ("pareto.png", "layer_errors.png")):
        assert image["alt"] and image["src"].startswith("data:image/png;base64,")  # opens offline
        embedded = base64.b64decode(image["src"].split(",", 1)[1])
        assert embedded == (tmp_path / name).read_bytes()  # and the file beside it is the same picture
        _nontrivial_png(embedded)
    assert "(pareto.png)" in paths["md"].read_text()
    # a run split across processes joins back into the same rows, in the same order
    first = {**data, "config": {**data["config"], "schemes": ["W4A16"]}, "rows": data["rows"][:3]}
    second = {**data, "config": {**data["config"], "schemes": ["NF4"]}, "rows": data["rows"][3:]}
    assert merge([first, second])["rows"] == data["rows"]
    with pytest.raises(LowbitError, match="differ in model or settings"):
        merge([first, {**second, "config": {**second["config"], "window": 32}}])
    with pytest.raises(LowbitError, match="no row 'FP"):
        merge([second])
    unfinished = merge([second], allow_missing=True)["rows"]
    assert unfinished[0]["skipped"].startswith("not measured") and unfinished[1:] == data["rows"][3:]
    gptq = next(r for r in data["rows"] if r["label"] == "W4A16 GPTQ")
    rtn = next(r for r in data["rows"] if r["label"] == "W4A16 RTN")
    assert len(gptq["layer_errors"]) == 2 and sum(gptq["layer_errors"]) < sum(rtn["layer_errors"])


def test_pareto_front():
    points = [(1.0, 5.0), (2.0, 3.0), (2.0, 4.0), (3.0, 3.5), (4.0, 1.0)]
    assert pareto_front(points, higher_is_better=False) == [(1.0, 5.0), (2.0, 3.0), (4.0, 1.0)]
    assert pareto_front(points, higher_is_better=True) == [(1.0, 5.0)]


@pytest.mark.parametrize("args, message", [
    (["--schemes", "W5A16"], "W5A16"),
    (["--methods", "rtn,fast"], "unknown method 'fast'"),
    (["--tasks", "lastword,boolq"], "unknown task 'boolq'; available: lastword, nextsent"),
    (["--schemes", " , "], "--schemes names nothing"),
])
def test_compare_refuses_bad_names_before_loading(tmp_path, args, message):
    result = CliRunner().invoke(cli, ["compare", "default", "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
