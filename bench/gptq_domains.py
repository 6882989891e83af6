"""GPTQ against RTN on the calibration domain and on two others: damping, act-order, calibration mix.

Issue 3 asks that GPTQ beat round-to-nearest not only on pydoc-eval (the domain of the
calibration text) but on a text of another domain too. This sweep measures what
decides that, at W4A16 int4 symmetric with groups of 128 and of 64: the damping λ (a
fraction of mean diag(H) added to the Hessian), act-order (static groups or g_idx), and
the calibration text — pydoc-calib alone or mixed half and half with stdlib-calib
(source of other standard modules than stdlib-code's; no evaluation text is ever
calibrated on). Each setting is the `lowbit quantize` command a user would run, in its
own process, evaluated on pydoc-eval, python-license (legal prose) and stdlib-code.

    python bench/gptq_domains.py [--only g128-rtn,g128-ao-d0.1] [--note "..."]

``--only`` runs some settings and keeps the other rows of an earlier run's JSON, so a
sweep can be finished in pieces; every row records when it was measured.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _runner import RESULTS, run_setting

TEXTS = ("pydoc-eval", "python-license", "stdlib-code")
PYDOC = ["--calib", "pydoc-calib"]  # named, not left to the CLI's default
MIX = ["--calib", "pydoc-calib", "--calib", "stdlib-calib"]


def _settings() -> list[tuple[str, str, list[str]]]:
    """(key, label, CLI arguments) for every setting of the sweep."""
    rows = []
    for g in (128, 64):
        base = ["--scheme", "W4A16", "--group-size", str(g)]
        rows.append((f"g{g}-rtn", f"int4 g{g} sym, RTN", base))
        for damp in (0.01, 0.1):
            gptq = base + ["--method", "gptq", "--damp", str(damp)]
            rows += [(f"g{g}-plain-d{damp}", f"int4 g{g} sym, GPTQ, damp {damp}", gptq + ["--no-act-order"] + PYDOC),
                     (f"g{g}-ao-d{damp}", f"int4 g{g} sym, GPTQ act-order (static groups), damp {damp}",
                      gptq + ["--act-order", "--static-groups"] + PYDOC),
                     (f"g{g}-ao-d{damp}-mix", f"int4 g{g} sym, GPTQ act-order (static groups), damp {damp}, "
                      "calib pydoc + stdlib", gptq + ["--act-order", "--static-groups"] + MIX)]
        rows.append((f"g{g}-gidx-d0.01", f"int4 g{g} sym, GPTQ act-order (g_idx), damp 0.01",
                     base + ["--method", "gptq", "--damp", "0.01", "--act-order", "--no-static-groups"] + PYDOC))
    for damp in (0.03, 0.3):
        rows.append((f"g128-ao-d{damp}", f"int4 g128 sym, GPTQ act-order (static groups), damp {damp}",
                     ["--scheme", "W4A16", "--group-size", "128", "--method", "gptq", "--damp", str(damp),
                      "--act-order", "--static-groups"] + PYDOC))
    return rows


def markdown(rows: list[dict], note: str) -> str:
    first = rows[0]
    lines = ["# GPTQ vs RTN across text domains (SmolLM2-135M-Instruct, W4A16 int4 symmetric)", "",
             f"torch {first['versions']['torch']} ({first['versions']['torch_threads']} threads), "
             f"{first['versions']['machine']}; calibration 128 × 512 tokens; FP ppl "
             + ", ".join(f"{t} {first['reference_ppl'][t]:.4f}" for t in TEXTS) + ".",
             "A ✓ marks a figure better than RTN's at the same group size (lower ppl, lower KL).", "",
             "| setting | calibration | " + " | ".join(f"ppl {t} | KL {t}" for t in TEXTS)
             + " | quantise s | measured |",
             "|---|---|" + "---:|---:|" * len(TEXTS) + "---:|---|"]
    rtn = {r["key"].split("-")[0]: r for r in rows if r["key"].endswith("-rtn")}
    for r in rows:
        ref = rtn.get(r["key"].split("-")[0])
        cells = []
        for t in TEXTS:
            for value, key in ((r["ppl"][t], "ppl"), (r["kl_per_text"][t], "kl_per_text")):
                better = ref is not None and ref is not r and value < ref[key][t]
                cells.append(f"{value:.4f}{' ✓' if better else ''}" if key == "ppl" else
                             f"{value:.5f}{' ✓' if better else ''}")
        calib = " + ".join(r["calibration"]["source"]) if r.get("calibration") else "—"
        lines.append(f"| {r['label']} | {calib} | {' | '.join(cells)} | {r['quantize_seconds']:.1f} | "
                     f"{r['versions']['date']} |")
    return "\n".join(lines) + ("\n\n" + note if note else "") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated setting keys (default: all)")
    parser.add_argument("--note", default="", help="a line to add under the table (e.g. load on the machine)")
    parser.add_argument("--list", action="store_true", help="print the setting keys and exit")
    args = parser.parse_args()
    settings = _settings()
    if args.list:
        print("\n".join(f"{key}: {label}" for key, label, _ in settings))
        return
    wanted = {k.strip() for k in args.only.split(",") if k.strip()}
    unknown = wanted - {key for key, _, _ in settings}
    if unknown:
        parser.error(f"unknown setting keys: {', '.join(sorted(unknown))} (see --list)")
    path = RESULTS / "gptq_domains.json"
    kept = {r["key"]: r for r in json.loads(path.read_text())} if wanted and path.exists() else {}
    texts = [a for t in TEXTS for a in ("--eval-text", t)]
    with tempfile.TemporaryDirectory() as tmp:
        for key, label, cli in settings:
            if wanted and key not in wanted:
                continue
            kept[key] = run_setting(label, cli + texts, Path(tmp)) | {"key": key}
            path.write_text(json.dumps([kept[k] for k, _, _ in settings if k in kept], indent=2) + "\n")
    rows = [kept[k] for k, _, _ in settings if k in kept]
    table = markdown(rows, args.note)
    (RESULTS / "gptq_domains.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
