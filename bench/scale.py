"""Streaming quantisation of a 7B-shaped model on this machine: peak memory and time, from disk.

1. Writes a synthetic LLaMA-architecture checkpoint with the shapes of LLaMA-7B (4096 hidden,
   11008 intermediate, 32 layers, 32000 vocabulary; random normal weights × 0.02, bfloat16, one
   safetensors shard per layer with an index: about 13.5 GB) into ``--dir`` (kept for reruns).
2. ``lowbit.streaming.quantize_streaming`` with RTN W4A16 g128 over all 32 layers, in a child
   process: wall time and its peak RSS (VmHWM).
3. The same with GPTQ on ``--calib-samples`` random token sequences: the child is stopped
   (SIGKILL) after ``--gptq-layers`` layers, its peak RSS read just before; the time per layer
   is extrapolated to 32. Then the same command is run again for one more layer and stopped:
   it resumes where the killed run left off (the work directory's record says which layer).

Writes bench/results/scale.md and .json. Figures are this machine's, today.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
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
    peak, times = 0, []
    while child.poll() is None:
        time.sleep(0.5)
        try:
            peak = max(peak, _hwm(child.pid))
        except OSError:
            break
        done = json.loads(work.read_text())["next_layer"] if work.is_file() else first
        while len(times) < done - first:
            times.append(time.perf_counter() - start)
        if stop_after is not None and done - first >= stop_after:
            child.send_signal(signal.SIGKILL)
            child.wait()
            return {"method": method, "first_layer": first, "layers_done": done - first, "layer_done_at_s": times,
                    "peak_rss_bytes": peak, "killed": True}
    result = json.loads(child.stdout.read().strip().splitlines()[-1])
    return {"method": method, "first_layer": first, "layers_done": SHAPE["num_hidden_layers"] - first,
            "seconds": result["seconds"], "peak_rss_bytes": max(peak, result["peak_rss_bytes"]), "killed": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/lowbit-synthetic-7b", help="where the synthetic checkpoint goes")
    parser.add_argument("--out", default="/tmp/lowbit-synthetic-7b-w4", help="quantised checkpoint")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--gptq-layers", type=int, default=2)
    args = parser.parse_args()
    source, out = Path(args.dir), Path(args.out)
    t = time.perf_counter()
    size = write_synthetic(source)
    made = time.perf_counter() - t
    print(f"synthetic checkpoint: {size:.2f} GB in {made:.0f} s", flush=True)
    rtn = run_child(source, out, "rtn", 0, 0, None)
    print("rtn", rtn, flush=True)
    gptq_out = out.with_name(out.name + "-gptq")
    gptq = run_child(source, gptq_out, "gptq", args.calib_samples, args.calib_seqlen, args.gptq_layers)
    print("gptq", gptq, flush=True)
    resumed = run_child(source, gptq_out, "gptq", args.calib_samples, args.calib_seqlen, 1)
    print("gptq resumed", resumed, flush=True)
    steps = [b - a for a, b in zip([0.0] + gptq["layer_done_at_s"], gptq["layer_done_at_s"])]
    per_layer = min(steps) if steps else None  # the first layer also carries start-up (loading, capture)
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_average": os.getloadavg()}
    payload = {"environment": env, "checkpoint_gb": size, "rtn": rtn, "gptq": gptq, "gptq_resumed": resumed,
               "gptq_seconds_per_layer": per_layer, "calibration": [args.calib_samples, args.calib_seqlen]}
    gb = 1e-9
    lines = [
        "# Streaming quantisation of a 7B-shaped model (bench/scale.py)", "",
        f"Measured {env['date']} on {env['machine']} (load average before: {env['load_average'][0]:.2f}). Synthetic "
        f"LLaMA-7B-shaped checkpoint (random weights, bf16, one shard per layer): {size:.2f} GB.", "",
        "| run | layers | time | peak RSS |", "|---|---:|---:|---:|",
        f"| RTN W4A16 g128, streamed | 32 | {rtn['seconds']:.0f} s | {rtn['peak_rss_bytes'] * gb:.2f} GB |",
        f"| GPTQ W4A16 g128 ({args.calib_samples} × {args.calib_seqlen} tokens), killed after "
        f"{gptq['layers_done']} layers | {gptq['layers_done']} | {gptq['layer_done_at_s'][-1]:.0f} s | "
        f"{gptq['peak_rss_bytes'] * gb:.2f} GB |",
        f"| same command again: resumed at layer {resumed['first_layer']}, killed after one more "
        "| "
        f"{resumed['layers_done']} | {resumed['layer_done_at_s'][-1]:.0f} s | {resumed['peak_rss_bytes'] * gb:.2f} GB |",
        "", f"GPTQ per layer (fastest of the killed run's layers): {per_layer:.0f} s; 32 layers extrapolated: "
        f"{32 * per_layer / 60:.0f} min." if per_layer else ""]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(payload, indent=1) + "\n")
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
