"""The bit-budget planner against uniform bit widths: bench/results/planner.json and planner.md.

All settings use int asym g128 codes (W3A16's) and the same method: uniform 3-bit (and, at
about the planner's 3.25 bits per weight, uniform 3-bit in groups of 64); the
planner with candidates 2, 3, 4, 8 bits at exactly uniform 3-bit's total weight bytes; the
planner with 3, 4, 8 bits in groups of 128 at 3.25 and at 3.5 bits per weight; the planner
choosing group sizes 32 / 64 / 128 as well (``--plan-groups``) at 3.25, 3.3 (just under
uniform int3 g64's 3.303) and 3.5, with plain (``--plan-weighting output``) and with
Fisher-weighted module errors (``--plan-weighting fisher``; with group candidates, the
planner's defaults); uniform int3 in groups of 32; and uniform 4-bit for reference.
The planner measures each module's output error on 32 × 512 tokens of pydoc-calib; GPTQ calibrates on
PROTOCOL.md's 128 × 512 unless ``--calib-samples`` says otherwise (the table's rows name it).
Evaluation as PROTOCOL.md says: pydoc-eval, perplexity over the first 16 windows of 2048
tokens, KL and top-1 against the float model over the first 4. Each setting is the command a
user would type, run as its own process.

    python bench/planner.py [--methods rtn,gptq] [--calib-samples N] [--only 'part;part'] [--note "..."]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from _runner import RESULTS, markdown, run_setting

from lowbit.footprint import config_footprint, read_config
from lowbit.scheme import W3A16


GROUPS = ["--scheme", "W3A16", "--plan-groups", "32,64,128"]
FISHER = ["--plan-weighting", "fisher"]
# the planner's defaults are Fisher weighting and group candidates (--plan-groups auto: 128, 64, 32 for W3A16); the
# rows before them name what they measured: plain output errors, the scheme's groups of 128 alone
PLAIN = ["--plan-weighting", "output"]
OWN_GROUPS = ["--plan-groups", "128"]


def settings(method: str, calib_samples: int | None = None) -> list[tuple[str, list[str]]]:
    uniform3_bytes = config_footprint(read_config("default"), W3A16).total_bytes
    common = ["--method", method]  # eval defaults: PROTOCOL.md's 16 windows for ppl, 4 for KL / top-1
    if method != "rtn" and calib_samples is not None:
        common += ["--calib-samples", str(calib_samples)]
        method = f"{method} ({calib_samples} × 512 calib)"
    return [
        (f"{method} uniform int3 g128", ["--scheme", "W3A16", *common]),
        # uniform 3-bit spending about a plan's extra bytes on smaller groups instead: the equal-bits comparison
        (f"{method} uniform int3 g64", ["--scheme", "W3A16", "--group-size", "64", *common]),
        (f"{method} plan at uniform int3's bytes, 2 bits allowed",
         ["--scheme", "W3A16", "--budget", str(uniform3_bytes), "--bits", "2,3,4,8", *OWN_GROUPS, *PLAIN, *common]),
        (f"{method} plan 3.25 bpw", ["--scheme", "W3A16", "--target-bpw", "3.25", *OWN_GROUPS, *PLAIN, *common]),
        (f"{method} plan 3.5 bpw", ["--scheme", "W3A16", "--target-bpw", "3.5", *OWN_GROUPS, *PLAIN, *common]),
        # group sizes as candidates too (--plan-groups): bits and group size per module
        (f"{method} plan 3.25 bpw, groups 32/64/128", [*GROUPS, "--target-bpw", "3.25", *PLAIN, *common]),
        (f"{method} plan 3.3 bpw, groups 32/64/128", [*GROUPS, "--target-bpw", "3.3", *PLAIN, *common]),
        (f"{method} plan 3.5 bpw, groups 32/64/128", [*GROUPS, "--target-bpw", "3.5", *PLAIN, *common]),
        # module errors weighted by the loss's Fisher on each output channel (--plan-weighting fisher)
        (f"{method} plan 3.25 bpw, Fisher", ["--scheme", "W3A16", "--target-bpw", "3.25", *OWN_GROUPS, *FISHER,
                                             *common]),
        # both: the planner's defaults (the flags spelled out)
        (f"{method} plan 3.3 bpw, groups 32/64/128, Fisher", [*GROUPS, "--target-bpw", "3.3", *FISHER, *common]),
        (f"{method} plan 3.5 bpw, groups 32/64/128, Fisher", [*GROUPS, "--target-bpw", "3.5", *FISHER, *common]),
        # the defaults as a user types them: must give the rows above with the flags spelled out
        (f"{method} plan 3.25 bpw, defaults", ["--scheme", "W3A16", "--target-bpw", "3.25", *common]),
        (f"{method} plan 3.5 bpw, defaults", ["--scheme", "W3A16", "--target-bpw", "3.5", *common]),
        (f"{method} uniform int3 g32", ["--scheme", "W3A16", "--group-size", "32", *common]),
        (f"{method} uniform int4 g128", ["--scheme", "W4A16_ASYM", *common]),
    ]


def _compact(row: dict) -> dict:
    """The row without its plan's copy of the mixed scheme (the report's own ``scheme``, 2,500 lines each),
    which reports written before 2026-11-28 carried (`lowbit.quantize` now keeps the plan without it)."""
    plan = row.get("details", {}).get("bit_plan")
    if plan is not None and plan.get("scheme") == row.get("scheme"):
        plan.pop("scheme")
    return row


def plan_column(rows: list[dict]) -> str:
    lines = ["| setting | modules at 2 / 3 / 4 / 8 bits | modules per spec | planned linears bytes | budget met "
             "| plan s |", "|---|---|---|---:|---|---:|"]
    for r in rows:
        plan = r.get("details", {}).get("bit_plan")
        if plan is None:
            continue
        hist = plan["bits_histogram"]
        counts = " / ".join(str(hist.get(str(b), 0)) for b in (2, 3, 4, 8))
        if plan["target_bpw"] is not None:
            bpw, target = r["bits_per_weight"], plan["target_bpw"]
            met = f"{bpw:.4f} ≤ {target} bpw: {8 * r['quantized_bytes'] <= target * r['quantized_params']}"
        else:
            total, budget = r["weight_bytes"], plan["budget_bytes"]
            met = f"{total:,} ≤ {budget:,} bytes: {total <= budget}"
        specs = ", ".join(f"{n} {spec}" for spec, n in plan.get("spec_histogram", {}).items())
        seconds = f"{plan['seconds']:.0f}" if plan.get("seconds") else "—"  # recorded since 2026-11-27 23:20
        lines.append(f"| {r['label']} | {counts} | {specs} | {plan['quantized_bytes']:,} | {met} | {seconds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="rtn,gptq")
    parser.add_argument("--note", default="")
    parser.add_argument("--calib-samples", type=int, default=None,
                        help="GPTQ calibration sequences (default: the CLI's, PROTOCOL.md's 128)")
    parser.add_argument("--append", action="store_true", help="keep planner.json's rows of other settings")
    parser.add_argument("--only", default="",
                        help="parts of labels to run, separated by ';' (labels hold commas; default: all)")
    parser.add_argument("--tabulate", action="store_true", help="only rewrite planner.md from planner.json (and drop copies from it)")
    args = parser.parse_args()
    out = RESULTS / "planner.json"
    if args.tabulate:
        rows = [_compact(r) for r in json.loads(out.read_text())]
        out.write_text(json.dumps(rows, indent=2) + "\n")
    else:
        rows = json.loads(out.read_text()) if args.append and out.is_file() else []
        RESULTS.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            for method in args.methods.split(","):
                for label, a in settings(method, args.calib_samples):
                    if args.only and not any(part.strip() in label for part in args.only.split(";") if part.strip()):
                        continue
                    before = os.getloadavg()
                    row = run_setting(label, a, Path(tmp))
                    row["load_average"] = {"start": before, "end": os.getloadavg()}
                    if args.append and out.is_file():  # another invocation may have added rows meanwhile
                        rows = json.loads(out.read_text())
                    rows = [_compact(r) for r in rows if r["label"] != label] + [_compact(row)]
                    out.write_text(json.dumps(rows, indent=2) + "\n")  # after each setting: a long run keeps its part
    load_start, load_end = rows[0]["load_average"]["start"], rows[-1]["load_average"]["end"]
    note = (f"Load average (1/5/15 min) {load_start[0]:.2f}/{load_start[1]:.2f}/{load_start[2]:.2f} at the start, "
            f"{load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f} at the end (a shared machine)."
            + (f" {args.note}" if args.note else "") + "\n\n" + plan_column(rows))
    table = markdown("Bit-budget planner vs uniform bits", rows, note)
    (RESULTS / "planner.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
