"""Round-to-nearest on the default model, every format: bench/results/rtn.json and rtn.md.

Each setting runs as its own `lowbit quantize` process (the command a user would run),
so peak RSS is that of one quantise-and-evaluate job. Evaluation follows PROTOCOL.md:
perplexity over the 2048-token windows of pydoc-eval, KL and top-1 against the float
model over the first 4 windows. Figures are what this machine measured, today.

    python bench/rtn.py [--only W4A16,NF4] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS: list[tuple[str, list[str]]] = [
    ("W8A16 int8 per-channel sym", ["--scheme", "W8A16"]),
    ("W4A16 int4 g128 sym", ["--scheme", "W4A16"]),
    ("W4A16 int4 g128 asym", ["--scheme", "W4A16_ASYM"]),
    ("W4A16 int4 g128 asym, MSE clipping", ["--scheme", "W4A16_ASYM", "--observer", "mse"]),
    ("W3A16 int3 g128 asym", ["--scheme", "W3A16"]),
    ("NF4 g64", ["--scheme", "NF4"]),
    ("FP8 e4m3 per-channel, dynamic per-token activations", ["--scheme", "FP8"]),
    ("W8A8 int8 per-channel, dynamic per-token activations", ["--scheme", "W8A8"]),
]


def run_setting(label: str, args: list[str], workdir: Path) -> dict:
    report_path = workdir / (label.split()[0] + f"-{abs(hash(label))}.json")
    cmd = [sys.executable, "-m", "lowbit.cli", "quantize", "default", *args, "--json", str(report_path)]
    print(f"== {label}: {' '.join(cmd[3:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    report = json.loads(report_path.read_text())
    report["label"] = label
    report["wall_seconds"] = time.perf_counter() - start
    return report


def markdown(rows: list[dict]) -> str:
    first = rows[0]
    v = first["versions"]
    lines = [
        f"# RTN on SmolLM2-135M-Instruct (pydoc-eval, {first['eval']['pydoc-eval']['tokens']:,} predicted tokens)",
        "",
        f"Measured {v['date']} on {v['machine']}, torch {v['torch']} ({v['torch_threads']} threads), "
        f"transformers {v['transformers']}, lowbit {v['lowbit']}. FP perplexity {first['reference_ppl']['pydoc-eval']:.4f}.",
        "Bits per weight count scales and zero points; weights = all stored bytes (embeddings in bf16).",
        "",
        "| setting | bits/weight | weights MB | ppl | Δppl | KL | top-1 % | quantise s | peak RSS GB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ppl, ref = r["ppl"]["pydoc-eval"], r["reference_ppl"]["pydoc-eval"]
        lines.append(
            f"| {r['label']} | {r['bits_per_weight']:.3f} | {r['weight_bytes'] / 1e6:.1f} | {ppl:.4f} | "
            f"{100 * (ppl / ref - 1):+.2f}% | {r['kl']:.5f} | {r['top1']:.2f} | {r['quantize_seconds']:.1f} | "
            f"{r['peak_rss_bytes'] / 1e9:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated scheme names to run (default: all)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    wanted = {s.strip().upper() for s in args.only.split(",") if s.strip()}
    settings = [(label, a) for label, a in SETTINGS if not wanted or a[1].upper() in wanted]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_setting(label, a, Path(tmp)) for label, a in settings]
    (out / "rtn.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "rtn.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
