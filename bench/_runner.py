"""Shared by the bench scripts: run `lowbit quantize` per setting and tabulate its JSON reports.

Each setting runs as its own process — the command a user would run — so peak RSS is
that of one quantise-and-evaluate job. Evaluation follows PROTOCOL.md: perplexity over
the 2048-token windows of each text, KL and top-1 against the float model over the first
4 windows of the first text. Figures are what this machine measured, today.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def run_setting(label: str, args: list[str], workdir: Path) -> dict:
    report_path = workdir / f"{abs(hash(label))}.json"
    cmd = [sys.executable, "-m", "lowbit.cli", "quantize", "default", *args, "--json", str(report_path)]
    print(f"== {label}: {' '.join(cmd[3:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    report = json.loads(report_path.read_text())
    report["label"] = label
    report["wall_seconds"] = time.perf_counter() - start
    return report


def markdown(title: str, rows: list[dict], note: str = "") -> str:
    first = rows[0]
    v = first["versions"]
    text, *others = list(first["ppl"])
    lines = [
        f"# {title} (SmolLM2-135M-Instruct, {text}, {first['eval'][text]['tokens']:,} predicted tokens)",
        "",
        f"Measured {v['date']} on {v['machine']}, torch {v['torch']} ({v['torch_threads']} threads), "
        f"transformers {v['transformers']}, lowbit {v['lowbit']}. FP perplexity {first['reference_ppl'][text]:.4f}"
        + "".join(f"; on {o} {first['reference_ppl'][o]:.4f}" for o in others) + ".",
        "Bits per weight count scales, zero points and g_idx; weights = all stored bytes (embeddings in bf16). "
        "Peak RSS: of the quantising process, read before it evaluates.",
        "",
        "| setting | bits/weight | weights MB | ppl | Δppl | KL | top-1 % | "
        + "".join(f"ppl {o} | KL {o} | " for o in others) + "quantise s | peak RSS GB |",
        "|---|---:|---:|---:|---:|---:|---:|" + "---:|---:|" * len(others) + "---:|---:|",
    ]
    for r in rows:
        ppl, ref = r["ppl"][text], r["reference_ppl"][text]
        lines.append(
            f"| {r['label']} | {r['bits_per_weight']:.3f} | {r['weight_bytes'] / 1e6:.1f} | {ppl:.4f} | "
            f"{100 * (ppl / ref - 1):+.2f}% | {r['kl']:.5f} | {r['top1']:.2f} | "
            + "".join(f"{r['ppl'][o]:.4f} | {r['kl_per_text'][o]:.5f} | " for o in others)
            + f"{r['quantize_seconds']:.1f} | {r.get('peak_rss_quantize_bytes', r['peak_rss_bytes']) / 1e9:.2f} |"
        )
    return "\n".join(lines) + ("\n\n" + note if note else "") + "\n"


def main(name: str, title: str, settings: list[tuple[str, list[str]]], doc: str) -> None:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated labels' first words to run (default: all)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--note", default="", help="a line to add under the table (e.g. load on the machine)")
    args = parser.parse_args()
    wanted = {s.strip() for s in args.only.split(",") if s.strip()}
    chosen = [(label, a) for label, a in settings if not wanted or label.split()[0] in wanted]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_setting(label, a, Path(tmp)) for label, a in chosen]
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = markdown(title, rows, args.note)
    (out / f"{name}.md").write_text(table)
    print(table)
