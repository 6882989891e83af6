"""Tables the command line prints (rich), kept apart from the commands that compute them."""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone
from typing import Any

from rich.console import Console
from rich.table import Table

from lowbit.footprint import Footprint, gpus_that_fit
from lowbit.scheme import Scheme


def _console() -> Console:
    """Rich's console; piped output gets a wide fixed width so tables never wrap mid-cell."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB"


def print_demo_table(scheme: Scheme, method: str, report, float_bytes: int, quantize_seconds: float,
                     load_seconds: float, console: Console | None = None) -> None:
    """The before/after table of `lowbit demo`; ``report`` is an `EvalReport` with a reference."""
    console = console or _console()
    result = next(iter(report.results.values()))
    fp = report.footprint
    table = Table(title=f"SmolLM2-135M-Instruct on pydoc-eval ({result.tokens:,} tokens, {result.windows} windows)")
    for column in ("model", "bits/weight (linears)", "weights", "ppl", "KL vs FP", "top-1 vs FP", "time"):
        table.add_column(column, justify="left" if column == "model" else "right")
    table.add_row("FP (bf16 storage)", "16.00", _mb(float_bytes), f"{result.reference_ppl:.3f}", "0", "100.00%",
                  f"load {load_seconds:.1f} s")
    table.add_row(f"{scheme.name} {method}", f"{fp.bits_per_weight:.3f}", _mb(fp.total_bytes), f"{result.ppl:.3f}",
                  f"{result.kl:.4f}", f"{result.top1:.2f}%", f"quantise {quantize_seconds:.1f} s")
    console.print(table)
    console.print(f"scheme: {scheme.describe()}; ppl change {100 * (result.ppl / result.reference_ppl - 1):+.2f}%; "
                  f"weights {float_bytes / fp.total_bytes:.2f}× smaller (embeddings stay in bf16).")


def print_size_table(model: str, scheme: Scheme, full: Footprint, quant: Footprint,
                     console: Console | None = None) -> None:
    console = console or _console()
    table = Table(title=f"weights of {model}: {full.total_params / 1e9:.3f} B parameters")
    for column in ("storage", "bits/weight (linears)", "weights"):
        table.add_column(column, justify="right")
    table.add_row("bf16", "16.000", _gb(full.total_bytes))
    table.add_row(scheme.describe(), f"{quant.bits_per_weight or 16:.3f}", _gb(quant.total_bytes))
    console.print(table)
    gpus = Table(title="cards needed (weights within 90% of each card's memory; KV cache not counted)")
    gpus.add_column("GPU")
    gpus.add_column("bf16", justify="right")
    gpus.add_column(scheme.name, justify="right")
    for (name, _, n_full), (_, _, n_quant) in zip(gpus_that_fit(full.total_bytes), gpus_that_fit(quant.total_bytes)):
        gpus.add_row(name, "1 (fits)" if n_full == 1 else str(n_full), "1 (fits)" if n_quant == 1 else str(n_quant))
    console.print(gpus)


def print_plan_table(plan, console: Console | None = None) -> None:
    """The bit planner's choice (a `lowbit.planner.BitPlan`): one row per module, then the totals."""
    console = console or _console()
    target = (f"target {plan.target.bits_per_weight:g} bits/weight" if plan.target.bits_per_weight is not None
              else f"budget {_gb(plan.target.total_bytes)}")
    table = Table(title=f"bit plan ({target}; errors measured with {plan.measured_with} on "
                        f"{plan.calibration_tokens:,} tokens)")
    for column in ("module", "bits", "spec", "output error", "relative", "bytes"):
        table.add_column(column, justify="left" if column in ("module", "spec") else "right")
    for row in plan.rows:
        table.add_row(row.module, str(row.spec.bits), row.spec.describe(), f"{row.error:.4g}",
                      f"{row.relative_error:.2e}", f"{row.nbytes:,}")
    console.print(table)
    counts = ", ".join(f"{n} at {bits} bits" for bits, n in plan.bits_histogram().items())
    specs = plan.spec_histogram()
    if len(specs) > len(plan.bits_histogram()):  # group sizes were planned too
        counts += " (" + ", ".join(f"{n} {spec}" for spec, n in specs.items()) + ")"
    console.print(f"{counts}; linears {plan.quantized_bytes:,} bytes of {plan.linear_budget:,} allowed, "
                  f"{plan.bits_per_weight:.4f} bits per weight; weights {_gb(plan.total_bytes)} in all; "
                  f"summed output error {plan.total_error:.4g}.")


def versions() -> dict[str, Any]:
    """The versions, machine, thread count and UTC time that every report and bench result records."""
    import torch
    import transformers

    from lowbit import __version__

    return {"lowbit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch_threads": torch.get_num_threads(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
