"""A full lm-eval run of lowbit's local tasks on the default model, on this CPU, through the bridge.

Runs ``lowbit eval default --harness --tasks lastword[,nextsent]`` (every item pydoc-eval
gives: lm-eval 0.4 reads the JSONL + YAML lowbit writes, and scores through
`lowbit.eval.harness.LowbitLM`), then the same tasks natively, and writes
bench/results/lm_eval_bridge.{json,md} with the wall time and the load average before and
after each run (the machine is shared: times are inflated by other jobs).

    python bench/lm_eval_bridge.py [--tasks lastword] [--skip-native]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def run(tasks: str, harness: bool, workdir: Path) -> dict:
    out = workdir / f"{'harness' if harness else 'native'}.json"
    cmd = [sys.executable, "-m", "lowbit.cli", "eval", "default", "--tasks", tasks, "--json", str(out)]
    cmd += ["--harness"] if harness else []
    load_before, start = os.getloadavg()[0], time.perf_counter()
    subprocess.run(cmd, check=True)
    report = json.loads(out.read_text())
    report.update(wall_seconds=time.perf_counter() - start, load_before=load_before, load_after=os.getloadavg()[0],
                  command=" ".join(["lowbit", *cmd[3:-2]]))
    return report


def markdown(reports: list[dict]) -> str:
    v = reports[0]["versions"]
    lines = ["# lowbit's local tasks through lm-eval on the default model (CPU)", "",
             f"Measured {v['date']} on {v['machine']}, torch {v['torch']} ({v['torch_threads']} threads), "
             f"transformers {v['transformers']}, lowbit {v['lowbit']}; lm-eval 0.4 through lowbit.eval.harness. "
             "The machine is shared with other jobs: wall times are inflated by them (load averages below).", "",
             "| run | task | items | metrics (95 % bootstrap interval over items) | wall s | load before → after |",
             "|---|---|---:|---|---:|---|"]
    for r in reports:
        for name, t in r["tasks"].items():
            figures = ", ".join(
                f"{m} {t[m]:.4f} [{t['intervals'][m]['low']:.4f}, {t['intervals'][m]['high']:.4f}]"
                if m in t["intervals"] else f"{m} {t[m]:.4f}" for m in ("acc", "acc_norm", "perplexity") if m in t)
            lines.append(f"| `{r['command']}` | {name} | {t['items']} | {figures} | {r['wall_seconds']:.0f} | "
                         f"{r['load_before']:.1f} → {r['load_after']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="lastword")
    parser.add_argument("--skip-native", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        reports = [run(args.tasks, True, Path(tmp))]
        if not args.skip_native:
            reports.append(run(args.tasks, False, Path(tmp)))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lm_eval_bridge.json").write_text(json.dumps(reports, indent=2) + "\n")
    (RESULTS / "lm_eval_bridge.md").write_text(markdown(reports))
    print(markdown(reports))


if __name__ == "__main__":
    main()
