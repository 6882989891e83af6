"""The plots of ``lowbit compare`` (matplotlib, Agg backend, PNG): accuracy against size with the
Pareto front, and the per-layer quantisation error of each method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from lowbit.eval.bootstrap import Estimate  # noqa: E402

MARKERS = {"float": "*", "rtn": "o", "gptq": "s", "awq": "^", "awq+gptq": "v", "smoothquant": "D",
           "smoothquant+gptq": "P"}


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both size (smaller) and figure; sorted by size."""
    front, best = [], None
    for x, y in sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1])):
        if best is None or (y > best if higher_is_better else y < best):
            front.append((x, y))
            best = y
    return front


def plot_pareto(data: dict[str, Any], est: dict[str, dict[str, Estimate]], path: Path) -> Path:
    """One panel per figure (perplexity and KL: lower is better; top-1 and tasks: higher), each against
    the weight size, with 95 % intervals as error bars and the Pareto front as a dashed line."""
    from lowbit.compare_report import _metric_title, metrics_of

    rows = [r for r in data["rows"] if not r.get("skipped")]
    metrics = [m for m in metrics_of(data) if any(m in est.get(r["label"], {}) for r in rows)]
    columns = min(3, len(metrics))
    lines = (len(metrics) + columns - 1) // columns
    fig, axes = plt.subplots(lines, columns, figsize=(5.2 * columns, 4.2 * lines), squeeze=False)
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(schemes)}
    for ax, metric in zip(axes.flat, metrics):
        higher = metric.startswith(("top1", "task"))
        points = []
        for r in rows:
            e = est[r["label"]].get(metric)
            if e is None:
                continue
            x = r["weight_bytes"] / 1e6
            ax.errorbar(x, e.value, yerr=[[e.value - e.low], [e.high - e.value]], fmt=MARKERS.get(r["method"], "o"),
                        color=colors[r["scheme"]], markersize=8, capsize=3,
                        label=f"{r['scheme']} {r['method']}" if r["method"] != "float" else "FP (bf16 storage)")
            points.append((x, e.value))
        front = pareto_front(points, higher)
        if len(front) > 1:
            ax.plot(*zip(*front), "--", color="grey", linewidth=1, label="Pareto front")
        if metric.startswith(("kl", "ppl")) and all(y > 0 for _, y in points):
            ax.set_yscale("log")
        ax.set_xlabel("weight storage (MB; embeddings in bf16)")
        title = _metric_title(metric, data)
        unit = {"kl": "KL(P_fp ‖ P_q), nats per token", "ppl": "perplexity (lower is better)",
                "top1": "top-1 agreement with FP (%)", "task": "accuracy (%)"}[metric.split(":")[0]]
        ax.set_ylabel(unit)
        ax.set_title(title + (" — higher is better" if higher else " — lower is better"), fontsize=10)
        ax.grid(True, alpha=0.3)
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=9, frameon=False)
    fig.suptitle(f"{data['model']}: quality against size (95 % bootstrap intervals)", fontsize=12)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layer_errors(data: dict[str, Any], path: Path) -> Path:
    """Relative output error per decoder layer: one panel per scheme, one line per method."""
    rows = [r for r in data["rows"] if r.get("layer_errors")]
    schemes = list(dict.fromkeys(r["scheme"] for r in rows)) or ["(none)"]
    fig, axes = plt.subplots(1, len(schemes), figsize=(5.2 * len(schemes), 4.2), squeeze=False, sharey=True)
    for ax, scheme in zip(axes.flat, schemes):
        for r in rows:
            if r["scheme"] != scheme:
                continue
            errors = r["layer_errors"]
            ax.plot(range(len(errors)), errors, marker=MARKERS.get(r["method"], "o"), markersize=4,
                    label=r["method"].upper())
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("decoder layer")
        ax.set_title(scheme, fontsize=10)
        ax.grid(True, alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(title="method", fontsize=9)
    axes.flat[0].set_ylabel("relative output error ‖ΔW X‖² / ‖W X‖² (log)")
    fig.suptitle(f"{data['model']}: per-layer quantisation error on the float model's calibration inputs",
                 fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
