"""Streaming quantisation of a 7B-shaped model on this machine: peak memory and time, from disk.

1. Writes a synthetic LLaMA-architecture checkpoint with the shapes of LLaMA-7B (4096 hidden,
   11008 intermediate, 32 layers, 32000 vocabulary; random normal weights × 0.02, bfloat16, one
   safetensors shard per layer with an index: about 13.5 GB) into ``--dir`` (kept for reruns).
2. ``lowbit.streaming.quantize_streaming`` with RTN W4A16 g128 over all 32 layers, in a child
   process: wall time and its peak RSS (VmHWM).
3. The same with GPTQ on ``--calib-samples`` random token sequences: the child is stopped
   (SIGKILL) after ``--gptq-layers`` layers, its peak RSS read just before; the time per layer
   (the mean of the layers after the first, which also carries the start-up) is extrapolated
   to 32. Then, unless ``--no-resume-check``, the same command is run again for one more layer
   and stopped: it resumes where the killed run left off (the work directory's record says which).

``--runs rtn`` or ``--runs gptq`` measures one of them; the other keeps its row (and its date)
from the last scale.json. Writes bench/results/scale.md and .json: figures are this machine's,
with the load average seen during each run (the machine is shared).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SHAPE = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def write_synthetic(directory: Path) -> float:
    """The 7B-shaped checkpoint, one layer in memory at a time; returns its size in GB."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (directory / "model.safetensors.index.json").is_file():
        return sum(p.stat().st_size for p in directory.glob("*.safetensors")) / 1e9
    directory.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPE, tie_word_embeddings=False, torch_dtype="bfloat16")
    config.save_pretrained(directory)
    h, i, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    def shards():  # (file name, tensors), made one shard at a time
        yield "model-embed.safetensors", {"model.embed_tokens.weight": rand(v, h)}
        for layer in range(SHAPE["num_hidden_layers"]):
            p = f"model.layers.{layer}."
            yield f"model-layer-{layer:02d}.safetensors", {
                p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(h, h),
                p + "self_attn.v_proj.weight": rand(h, h), p + "self_attn.o_proj.weight": rand(h, h),
                p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
                p + "mlp.down_proj.weight": rand(h, i),
                p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        yield "model-head.safetensors", {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                                         "lm_head.weight": rand(v, h)}

    weight_map, total = {}, 0
    for name, tensors in shards():
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.nbytes
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total / 1e9


CHILD = r"""
import sys, time, json, resource
sys.path.insert(0, "src")
import torch
from lowbit.streaming import quantize_streaming
from lowbit.algorithms.gptq import GPTQ
source, out, method, samples, seqlen = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
calib = torch.randint(0, 32000, (samples, seqlen), generator=torch.Generator().manual_seed(0))
start = time.perf_counter()
quantize_streaming(source, out, "W4A16", GPTQ() if method == "gptq" else None, calib if method == "gptq" else None,
                   progress=False, overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)
"""


def _hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_child(source: Path, out: Path, method: str, samples: int, seqlen: int, stop_after: int | None) -> dict:
    """One streaming run in a child process; with ``stop_after``, killed once that many layers are recorded."""
    work = out.parent / f".{out.name}.partial" / "run.json"
    first = json.loads(work.read_text())["next_layer"] if work.is_file() else 0
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(source), str(out), method, str(samples), str(seqlen)],
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    peak, times, loads = 0, [], []
    while child.poll() is None:
        time.sleep(0.5)
        try:
            peak = max(peak, _hwm(child.pid))
        except OSError:
            break
        if not loads or time.perf_counter() - start > 10 * len(loads):  # the 1-minute load, every 10 s
            loads.append(os.getloadavg()[0])
        done = json.loads(work.read_text())["next_layer"] if work.is_file() else first
        while len(times) < done - first:
            times.append(time.perf_counter() - start)
        if stop_after is not None and done - first >= stop_after:
            child.send_signal(signal.SIGKILL)
            child.wait()
            return {"method": method, "first_layer": first, "layers_done": done - first, "layer_done_at_s": times,
                    "peak_rss_bytes": peak, "killed": True, "load": _load_summary(loads)}
    if child.returncode != 0:
        raise SystemExit(f"the {method} child failed with exit status {child.returncode}")
    result = json.loads(child.stdout.read().strip().splitlines()[-1])
    return {"method": method, "first_layer": first, "layers_done": SHAPE["num_hidden_layers"] - first,
            "seconds": result["seconds"], "peak_rss_bytes": max(peak, result["peak_rss_bytes"]), "killed": False,
            "load": _load_summary(loads)}


def _load_summary(loads: list[float]) -> dict[str, float]:
    """The 1-minute load average seen during a run (other engineers' jobs share the cores)."""
    return {"min": min(loads), "mean": sum(loads) / len(loads), "max": max(loads)} if loads else {}


def _per_layer(run: dict) -> float | None:
    """Seconds per layer of a killed run: the mean of its layers after the first (the first also carries the
    start-up: building the model, capturing the calibration inputs), or the first if it is all there is."""
    done = run["layer_done_at_s"]
    steps = [b - a for a, b in zip([0.0] + done, done)]
    return sum(steps[1:]) / len(steps[1:]) if len(steps) > 1 else (steps[0] if steps else None)


def attach_child(pid: int, out: Path, stop_after: int, deadline_s: float | None = None) -> dict:
    """`run_child`'s measurement of a GPTQ child that an earlier invocation of this script started (``--attach``,
    for a run that outlives its invocation's plan): its peak is the kernel's high-water mark (VmHWM, kept over
    the process's whole life), a layer's finish time the modification time of the work directory's record
    (written as the layer is done) after the child's start; killed once ``stop_after`` layers are recorded."""
    work = out.parent / f".{out.name}.partial" / "run.json"
    ticks = os.sysconf("SC_CLK_TCK")
    started = float(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
    boot = time.time() - float(Path("/proc/uptime").read_text().split()[0])
    start = boot + started  # the child's start, as a wall-clock time
    if "quantize_streaming" not in Path(f"/proc/{pid}/cmdline").read_text():
        raise SystemExit(f"process {pid} is not a streaming child of this script")
    peak, times, loads = 0, [], []
    while True:
        peak = max(peak, _hwm(pid))
        if not loads or time.time() - start > 10 * len(loads):
            loads.append(os.getloadavg()[0])
        done = json.loads(work.read_text())["next_layer"] if work.is_file() else 0
        if done > len(times):
            times.append(work.stat().st_mtime - start)  # the record of the layer just finished
        stopped = deadline_s is not None and time.time() - start > deadline_s
        if done >= stop_after or stopped:
            os.kill(pid, signal.SIGKILL)
            return {"method": "gptq", "first_layer": 0, "layers_done": done, "layer_done_at_s": times,
                    "peak_rss_bytes": peak, "killed": True, "load": _load_summary(loads), "attached": True,
                    "stopped_at_s": time.time() - start if stopped else None}
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/lowbit-synthetic-7b", help="where the synthetic checkpoint goes")
    parser.add_argument("--out", default="/tmp/lowbit-synthetic-7b-w4", help="quantised checkpoint")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--gptq-layers", type=int, default=2)
    parser.add_argument("--no-resume-check", dest="resume_check", action="store_false",
                        help="skip re-running the killed GPTQ command for one more layer")
    parser.add_argument("--note", default="", help="a paragraph to add under the table")
    parser.add_argument("--tabulate", action="store_true", help="only rewrite scale.md from scale.json")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="with --attach: stop the child this many seconds after its start, layers done or not")
    parser.add_argument("--attach", type=int, default=None, metavar="PID",
                        help="measure the running GPTQ child PID (started by an earlier invocation) instead of "
                             "starting one; it must be at the layer count's start (a run from layer 0)")
    parser.add_argument("--runs", default="rtn,gptq", help="which runs to measure (rtn, gptq); a run left out keeps "
                        "its row from the previous bench/results/scale.json, with that run's date and load")
    args = parser.parse_args()
    runs = set(args.runs.split(","))
    if args.tabulate:
        payload = json.loads((RESULTS / "scale.json").read_text())
        payload["note"] = args.note or payload.get("note", "")
        (RESULTS / "scale.json").write_text(json.dumps(payload, indent=1) + "\n")
        (RESULTS / "scale.md").write_text("\n".join(table(payload)) + "\n")
        return
    source, out = Path(args.dir), Path(args.out)
    t = time.perf_counter()
    size = write_synthetic(source)
    made = time.perf_counter() - t
    print(f"synthetic checkpoint: {size:.2f} GB in {made:.0f} s", flush=True)
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_average": os.getloadavg(),
           "torch_threads": _torch_threads()}
    payload: dict = {"environment": env, "checkpoint_gb": size, "calibration": [args.calib_samples, args.calib_seqlen],
                     "note": args.note}
    if "rtn" in runs:
        payload["rtn"] = {**run_child(source, out, "rtn", 0, 0, None), "measured": env["date"]}
        print("rtn", payload["rtn"], flush=True)
    if "gptq" in runs:
        gptq_out = out.with_name(out.name + "-gptq")
        gptq = (attach_child(args.attach, gptq_out, args.gptq_layers, args.deadline_s) if args.attach else
                run_child(source, gptq_out, "gptq", args.calib_samples, args.calib_seqlen, args.gptq_layers))
        print("gptq", gptq, flush=True)
        resumed = None
        if args.resume_check:
            resumed = run_child(source, gptq_out, "gptq", args.calib_samples, args.calib_seqlen, 1)
            print("gptq resumed", resumed, flush=True)
        shutil.rmtree(gptq_out.parent / f".{gptq_out.name}.partial", ignore_errors=True)
        payload["gptq"] = {"killed_run": gptq, "resumed_run": resumed, "seconds_per_layer": _per_layer(gptq),
                           "calibration": [args.calib_samples, args.calib_seqlen], "measured": env["date"]}
    shutil.rmtree(out, ignore_errors=True)
    # a run left out keeps its row from the last scale.json (read now: another invocation may have just written it)
    previous = json.loads((RESULTS / "scale.json").read_text()) if (RESULTS / "scale.json").is_file() else {}
    for key in ("rtn", "gptq"):
        if key not in runs:
            payload[key] = previous.get(key)  # None: not measured yet (the table says so)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = table(payload)
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _load(run: dict) -> str:
    load = run.get("load") or {}
    return f"{load['min']:.1f}–{load['max']:.1f} (mean {load['mean']:.1f})" if load else "not recorded"


def table(payload: dict) -> list[str]:
    """bench/results/scale.md from the measurements (and the note, if any)."""
    lines = _rows(payload)
    return lines + (["", payload["note"]] if payload.get("note") else [])


def _rows(payload: dict) -> list[str]:
    gb = 1e-9
    env, rtn, gptq = payload["environment"], payload["rtn"], payload["gptq"]
    n = SHAPE["num_hidden_layers"]
    lines = [
        "# Streaming quantisation of a 7B-shaped model (bench/scale.py)", "",
        f"Written {env['date']} by bench/scale.py on {env['machine']} (torch on {env['torch_threads']} threads), "
        "shared with other engineers' jobs: the 1-minute load average during each run is given beside it, and "
        "times are inflated by it. Synthetic LLaMA-7B-shaped checkpoint written by the script (4096 hidden, 11008 "
        f"intermediate, 32 layers, random normal weights × 0.02, bf16, one safetensors shard per layer): "
        f"{payload['checkpoint_gb']:.2f} GB. Peak RSS is the child process's VmHWM (and ru_maxrss when it finishes).",
        "",
        "| run | measured | layers | time | peak RSS | load during the run |", "|---|---|---:|---:|---:|---|",
        f"| RTN W4A16 g128, all layers streamed and assembled | {rtn['measured']} | {rtn['layers_done']} | "
        f"{rtn['seconds']:.0f} s | {rtn['peak_rss_bytes'] * gb:.2f} GB | {_load(rtn)} |" if rtn else
        "| RTN W4A16 g128 | not measured | | | | |"]
    if not gptq:
        return lines + ["| GPTQ W4A16 g128 | not measured | | | | |"]
    killed, resumed = gptq["killed_run"], gptq["resumed_run"]
    samples, seqlen = gptq["calibration"]
    per_layer = gptq["seconds_per_layer"]
    if killed.get("stopped_at_s"):
        what, seconds = f"stopped at the deadline, {killed['layers_done']} layers done", killed["stopped_at_s"]
    else:
        what, seconds = f"killed after {killed['layers_done']} layers", killed["layer_done_at_s"][-1]
    lines += [
        f"| GPTQ W4A16 g128 (act-order, static groups; {samples} × {seqlen} random tokens), {what} | "
        f"{gptq['measured']} | {killed['layers_done']} | {seconds:.0f} s | {killed['peak_rss_bytes'] * gb:.2f} GB | "
        f"{_load(killed)} |"]
    if resumed:
        lines.append(f"| same command again: resumed at layer {resumed['first_layer']}, killed after one more | "
                     f"{gptq['measured']} | {resumed['layers_done']} | {resumed['layer_done_at_s'][-1]:.0f} s | "
                     f"{resumed['peak_rss_bytes'] * gb:.2f} GB | {_load(resumed)} |")
    lines += ["", "GPTQ layer finish times (s from the child's start): killed run "
              + (", ".join(f"{t:.0f}" for t in killed["layer_done_at_s"]) or "none")
              + ("; resumed run " + ", ".join(f"{t:.0f}" for t in resumed["layer_done_at_s"]) if resumed else "")
              + "."]
    if killed.get("attached"):
        lines += ["", "The GPTQ child was started by an earlier invocation of the script (planned for more layers) and "
                  "measured by this one (`--attach`): its peak is the kernel's high-water mark over its whole life, "
                  "its layer times the work directory's record's modification times after the child's start."]
    if per_layer:
        how = ("mean of the killed run's layers after its first, which also carries the start-up"
               if len(killed["layer_done_at_s"]) > 1 else "the one layer run, start-up (model on meta, calibration "
               "inputs through the embeddings) included")
        lines += ["", f"GPTQ per layer ({how}): {per_layer:.0f} s; all {n} layers extrapolated: "
                  f"{n * per_layer / 60:.0f} min (+ assembly), at the load above."]
    return lines


if __name__ == "__main__":
    main()
