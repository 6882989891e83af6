"""The report of ``lowbit compare``: report.md, report.html (opens offline: the plots are embedded
as data URIs and also written beside it) and two PNG plots, from compare.json.

Every perplexity, KL, top-1 and accuracy carries a 95 % bootstrap interval
(`lowbit.eval.bootstrap`: blocks of 256 positions for text figures, items for tasks), and
every pair of rows is compared by the paired bootstrap; pairs whose difference interval
contains 0 are listed as not distinguishable.
"""

from __future__ import annotations

import base64
import html
import itertools
from pathlib import Path
from typing import Any

from lowbit.eval.bootstrap import DRAWS, Difference, Estimate, Units, estimate, format_estimate, paired_difference
from lowbit.eval.metrics import BLOCK_TOKENS

PRIMARY = {"lastword": "acc", "choice": "acc_norm"}  # the accuracy the table shows per task kind


def _units(row: dict[str, Any], metric: str) -> Units | None:
    """The bootstrap units of ``metric``: 'ppl:TEXT', 'kl:TEXT', 'top1:TEXT' or 'task:NAME'."""
    kind, _, name = metric.partition(":")
    if kind == "task":
        task = row["tasks"].get(name)
        if not task:
            return None
        outcomes = task["correct_norm"] if task["kind"] == "choice" else task["correct"]
        return Units.of(outcomes, transform="percent")
    blocks = row["texts"].get(name, {}).get("blocks")
    if not blocks:
        return None
    if kind == "ppl":
        return Units.of(blocks["nll"], blocks["count"], "exp")
    if not blocks["kl_count"]:
        return None
    if kind == "kl":
        return Units.of(blocks["kl"], blocks["kl_count"])
    return Units.of(blocks["agree"], blocks["kl_count"], "percent")


def metrics_of(data: dict[str, Any]) -> list[str]:
    texts, tasks = data["config"]["texts"], data["config"]["tasks"]
    first = next((r for r in data["rows"] if r["tasks"]), None)
    task_names = list(first["tasks"]) if first else list(tasks)
    return ([f"ppl:{t}" for t in texts] + [f"kl:{texts[0]}", f"top1:{texts[0]}"]
            + [f"task:{t}" for t in task_names])


def estimates(data: dict[str, Any]) -> dict[str, dict[str, Estimate]]:
    """{row label: {metric: estimate}} for every measured row."""
    out: dict[str, dict[str, Estimate]] = {}
    for row in data["rows"]:
        if row.get("skipped"):
            continue
        out[row["label"]] = {m: estimate(u) for m in metrics_of(data) if (u := _units(row, m)) is not None}
    return out


def differences(data: dict[str, Any]) -> list[tuple[str, str, str, Difference]]:
    """(metric, row a, row b, a − b) for every pair of measured rows and every metric both have."""
    rows = [r for r in data["rows"] if not r.get("skipped")]
    out = []
    for metric in metrics_of(data):
        for a, b in itertools.combinations(rows, 2):
            ua, ub = _units(a, metric), _units(b, metric)
            if ua is not None and ub is not None:
                out.append((metric, a["label"], b["label"], paired_difference(ua, ub)))
    return out


def _metric_title(metric: str, data: dict[str, Any]) -> str:
    kind, _, name = metric.partition(":")
    if kind == "task":
        task_kind = next((r["tasks"][name]["kind"] for r in data["rows"] if name in r.get("tasks", {})), "lastword")
        return f"{name} {PRIMARY[task_kind]} %"
    return {"ppl": f"ppl {name}", "kl": f"KL vs FP ({name})", "top1": f"top-1 vs FP % ({name})"}[kind]


def _fmt(e: Estimate | None, metric: str) -> str:
    if e is None:
        return "—"
    return format_estimate(e, 4 if metric.startswith("kl") else 2 if metric.startswith(("ppl", "top1", "task")) else 3)


def table(data: dict[str, Any], est: dict[str, dict[str, Estimate]]) -> tuple[list[str], list[list[str]]]:
    """The report's table: header and rows of strings."""
    metrics = metrics_of(data)
    header = (["setting", "bits/weight", "weights MB"] + [_metric_title(m, data) for m in metrics]
              + ["quantise s", "decode tok/s", "peak RSS GB"])
    rows = []
    for row in data["rows"]:
        if row.get("skipped"):
            rows.append([row["label"], "skipped: " + row["skipped"]] + [""] * (len(header) - 2))
            continue
        bpw = row["bits_per_weight"]
        cells = [row["label"], f"{bpw:.3f}" if bpw else "—", f"{row['weight_bytes'] / 1e6:.1f}"]
        cells += [_fmt(est[row["label"]].get(m), m) for m in metrics]
        cells += [f"{row['quantize_seconds']:.1f}" if row["quantize_seconds"] is not None else "—",
                  f"{row['decode_tokens_per_s']:.1f}" if row["decode_tokens_per_s"] else "—",
                  f"{row['peak_rss_bytes'] / 1e9:.2f}" if row["peak_rss_bytes"] else "—"]
        rows.append(cells)
    return header, rows


def indistinguishable(data: dict[str, Any], diffs) -> list[str]:
    lines = []
    for metric, group in itertools.groupby(diffs, key=lambda d: d[0]):
        pairs = [f"{a} ≈ {b} (Δ {d.delta:+.4g} [{d.low:+.4g}, {d.high:+.4g}])" for _, a, b, d in group
                 if not d.distinguishable]
        if pairs:
            lines.append(f"{_metric_title(metric, data)}: " + "; ".join(pairs))
    return lines


def method_pairs(data: dict[str, Any], diffs) -> list[list[str]]:
    """Per scheme, each pair of its methods on each metric: Δ, interval, verdict."""
    by_label = {r["label"]: r for r in data["rows"]}
    out = []
    for metric, a, b, d in diffs:
        ra, rb = by_label[a], by_label[b]
        if ra["scheme"] == rb["scheme"] and ra["method"] != "float":
            verdict = "distinguishable" if d.distinguishable else "**not distinguishable**"
            out.append([ra["scheme"], f"{ra['method']} − {rb['method']}", _metric_title(metric, data),
                        f"{d.delta:+.4g}", f"[{d.low:+.4g}, {d.high:+.4g}]", verdict])
    return out


def notes(data: dict[str, Any]) -> list[str]:
    c, v = data["config"], data["versions"]
    rows = [r for r in data["rows"] if not r.get("skipped")]
    loads = [r["load_average"] for r in rows if r.get("load_average") is not None]
    task_counts = {name: t["items"] for r in rows for name, t in r["tasks"].items()}
    command = (f"lowbit compare {data['model']} --schemes {','.join(c['schemes'])} --methods {','.join(c['methods'])} "
               + "".join(f"--text {t} " for t in c["texts"])
               + f"--tasks {','.join(c['tasks'])} --task-items {c['task_items']} --calib-samples {c['calib_samples']} "
               f"--calib-seqlen {c['calib_seqlen']} --error-samples {c['error_samples']} --window {c['window']} "
               f"--max-windows {c['max_windows']} --kl-windows {c['kl_windows']} --decode-tokens {c['decode_new']}")
    return [
        f"Command: `{command} --out DIR`.",
        f"Model: {data['model']}. Measured {data['started']} – {data.get('finished', '?')} on {v['machine']}, "
        f"torch {v['torch']} ({v['torch_threads']} threads), transformers {v['transformers']}, lowbit {v['lowbit']}, "
        f"Python {v['python']}.",
        (f"1-minute load average when each row started: {min(loads):.1f}–{max(loads):.1f} (the machine is shared "
         "with other jobs: times and tokens/s are inflated accordingly)." if loads else ""),
        (f"The rows were measured by {data['merged_from']} processes running at the same time (lowbit compare "
         "--no-float-row, joined with --merge), each with its own copy of the float statistics: they slowed each "
         "other down too, and each peak RSS is its own process's." if data.get("merged_from", 1) > 1 else ""),
        f"Calibration (methods that use it): {c['calib_samples']} × {c['calib_seqlen']} tokens of {c['calib']} "
        "(random.Random(0) offsets)" + (" — fewer than PROTOCOL.md's 128 × 512, to keep the run short."
                                        if c["calib_samples"] * c["calib_seqlen"] < 128 * 512 else "."),
        f"Perplexity: non-overlapping {c['window']}-token windows of each text (at most {c['max_windows']}); KL("
        f"P_fp ‖ P_q) and top-1 agreement over the first {c['kl_windows']} windows of the first text, against the "
        "float model's log-probabilities computed once and cached.",
        "Tasks (scored natively, the same numbers as through lm-eval): " + ", ".join(
            f"{name} ({n} items)" for name, n in task_counts.items())
        + f", built from {c['task_text']}; lastword shows acc (greedy match of the word), choice tasks acc_norm "
          "(log-likelihood per character).",
        "Bits/weight: of the quantised linear layers, scales, zero points and g_idx included; weights MB: all "
        "stored weights, embeddings and norms at bf16. Decode: greedy tokens/s, batch 1, a "
        f"{c['decode_prompt']}-token prompt and {c['decode_new']} new tokens, one timed run after a warm-up. Peak "
        "RSS: the process's high-water mark while that row ran (reset before each row); the float model and the "
        "cached float statistics are resident throughout.",
        f"Per-layer error: relative output error Σ‖ΔW X‖² / Σ‖W X‖² per decoder layer on {c['error_samples']} "
        "calibration sequences of the float model's inputs (the same X for every method).",
        f"Intervals: 95 % percentile bootstrap, {DRAWS} draws — text figures over blocks of {BLOCK_TOKENS} positions, task "
        "figures over items; two rows are *not distinguishable* on a figure when the paired bootstrap interval "
        "of their difference contains 0.",
    ]


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def write_report(data: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """Write report.md, report.html, pareto.png and layer_errors.png into ``out``; returns their paths."""
    from lowbit.compare_plots import plot_layer_errors, plot_pareto

    out = Path(out)
    est = estimates(data)
    diffs = differences(data)
    header, rows = table(data, est)
    pareto = plot_pareto(data, est, out / "pareto.png")
    layers = plot_layer_errors(data, out / "layer_errors.png")
    same = indistinguishable(data, diffs) or [
        "every pair of rows differs on every figure." if diffs else "fewer than two measured rows: nothing compared."]
    pairs = method_pairs(data, diffs)
    title = f"lowbit compare: {data['model']}"
    skipped = [r for r in data["rows"] if r.get("skipped")]

    md = [f"# {title}", "", *[f"- {n}" for n in notes(data) if n], "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(cells) + " |" for cells in rows]
    md += ["", "Figures are value [95 % interval].", ""]
    if pairs:
        md += ["## Methods within a scheme", "", "| scheme | difference | figure | Δ | 95 % interval | verdict |",
               "|---|---|---|---:|---|---|"] + ["| " + " | ".join(p) + " |" for p in pairs] + [""]
    md += ["## Not distinguishable", ""]
    md += [f"- {line}" for line in same]
    md += ["", "## Plots", "", "![accuracy against size](pareto.png)", "",
           "![per-layer quantisation error](layer_errors.png)", ""]
    if skipped:
        md += ["## Skipped", ""] + [f"- {r['label']}: {r['skipped']}" for r in skipped] + [""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")

    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>", "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes(data) if n) + "</ul>",
            "<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    body += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>" for cells in rows]
    body += ["</tbody></table>", "<p>Figures are value [95 % interval].</p>"]
    if pairs:
        body += ["<h2>Methods within a scheme</h2><table><thead><tr>"
                 + "".join(f"<th>{h}</th>" for h in ("scheme", "difference", "figure", "Δ", "95 % interval", "verdict"))
                 + "</tr></thead><tbody>"]
        body += ["<tr>" + "".join(f"<td>{esc(c.replace('**', ''))}</td>" for c in p) + "</tr>" for p in pairs]
        body += ["</tbody></table>"]
    body += ["<h2>Not distinguishable</h2><ul>"
             + "".join(f"<li>{esc(line)}</li>" for line in same)
             + "</ul>", "<h2>Plots</h2>",
             f'<figure><img src="{_png_uri(pareto)}" alt="accuracy against size" width="100%">'
             '<figcaption>pareto.png</figcaption></figure>',
             f'<figure><img src="{_png_uri(layers)}" alt="per-layer quantisation error" width="100%">'
             '<figcaption>layer_errors.png</figcaption></figure>']
    if skipped:
        body += ["<h2>Skipped</h2><ul>" + "".join(f"<li>{esc(r['label'])}: {esc(r['skipped'])}</li>"
                                                   for r in skipped) + "</ul>"]
    style = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child{"
             "text-align:left}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")
    (out / "report.html").write_text(page, encoding="utf-8")
    return {"md": out / "report.md", "html": out / "report.html", "pareto": pareto, "layer_errors": layers}
