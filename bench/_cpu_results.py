"""What the CPU benches (bench/cpu_decode.py, bench/cpu_kernels.py) stamp on and how they write their results."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


class Stamp:
    """The date, machine and load of a run: take one before measuring, `finish` it after (the machine is
    shared, so the load at both ends is part of the figures)."""

    def __init__(self) -> None:
        self.load_before = os.getloadavg()[0]

    def finish(self) -> dict[str, str]:
        return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": f"{cpu_name()} ({platform.machine()}; lowbit's kernels built for {kernel_isa()}), "
                           f"{torch.get_num_threads()} threads, torch {torch.__version__}",
                "load": f"load average (1 min) {self.load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"}


def cpu_name() -> str:
    """The CPU's model name as the kernel reports it (the same project machine has been an AVX-512 and an AVX2 CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def kernel_isa() -> str:
    """The instruction sets lowbit's C++ kernels were built for on this machine, in words."""
    from lowbit.kernels.cpu import build_features, extension

    if extension() is not None:
        return "nothing: they could not be built"
    features = build_features()
    if "avx512" in features:
        return "AVX-512" + "".join(f" + {name.upper()}" for name in ("vbmi", "vnni") if name in features)
    return "AVX2 + FMA" if "avx2" in features else "no vector extension (portable loops)"


def write(name: str, stamp: dict[str, str], rows: list[dict], lines: list[str]) -> None:
    """bench/results/<name>.json (the stamp and the rows) and <name>.md (``lines``), and the table printed."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({**stamp, "rows": rows}, indent=2))
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
