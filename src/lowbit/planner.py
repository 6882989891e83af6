"""A bit-budget planner: how many bits each linear layer gets, for a target size.

Mixed precision spends bits where they buy the most accuracy. The planner does it in
three steps, each a function:

1. `measure_sensitivities` — for every selected linear and every candidate bit width,
   the damage quantisation would do to the layer's output on calibration data,
   ``e = tr((W − Q) H (W − Q)ᵀ) / 2 = ‖(W − Q)Xᵀ‖² / n`` with ``H = 2XᵀX / n`` the
   linear's input Hessian. This is the layer-wise objective GPTQ minimises (Frantar et
   al., arXiv 2210.17323, eq. 1), and it is the second-order term HAWQ-V2 (Dong et al.,
   arXiv 1911.03852) uses to rank layers — there with the Hessian of the loss, summarised
   by its trace, times ‖W − Q‖²; here with the exact quadratic form of the layer's own
   output Hessian, which for a linear layer needs no approximation and costs one
   (R, C) × (C, C) product per candidate. Q comes from round-to-nearest (cheap) or from a
   GPTQ solve (what GPTQ would really leave). The Hessians come from one pass of the
   *float* model through the layer-by-layer pipeline (`lowbit.calibration.pipeline`,
   `lowbit.algorithms.hessian`), so every module is measured against undamaged inputs
   and the measurement does not depend on the allocation it serves.
2. `allocate` — pick one candidate per module minimising the summed error subject to a
   byte budget: a multiple-choice knapsack. The Lagrangian relaxation is solved exactly
   by walking each module's lower convex hull of (bytes, error) in order of error saved
   per byte (the classic greedy for the LP relaxation; cf. HAWQ-V3's integer program,
   arXiv 2011.10680, which this replaces by a greedy because the instance is separable);
   the slack it leaves is then spent, and the solution improved, by single and paired
   moves until none helps. It is not a proof of optimality, but it is never worse than
   the hull solution, and the tests compare it with brute force on small instances.
3. `plan_bits` — both, for a target in bits per weight (counted as `lowbit.footprint`
   counts them: codes, scales and zero points, i.e. `lowbit.tensor.storage_bytes`) or
   total weight bytes (as `lowbit size` counts them: float tensors at 2 bytes each).
   The result, a `BitPlan`, holds a mixed `Scheme` (``Scheme.per_module``) that
   `lowbit.quantize` accepts directly, and the table of what was chosen.

Summing the layers' plain output errors treats a unit of squared error in any layer's output
as equally harmful, which it is not (a down projection writing into a residual stream with
massive activations shows large errors that the next RMSNorm scales away). By default
`plan_bits` therefore weights each output channel's error by the loss's Fisher there
(`output_fisher`) and offers smaller groups as well as more bits (`auto_group_sizes`). Both
are checked end to end by ``bench/planner.py``, which measures KL to the float model: on
the default model (RTN) the plain-error plans lose to uniform int3 in smaller groups at
equal bits, the Fisher-weighted plans with group candidates beat them.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.algorithms.gptq import GPTQ, gptq_factor, gptq_solve_group, output_error
from lowbit.algorithms.hessian import HessianAccumulator
from lowbit.calibration.pipeline import LayerInputs, capture_first_layer_inputs, collect, run_layer
from lowbit.errors import LowbitError
from lowbit.models import select_linears
from lowbit.scheme import QuantSpec, Scheme
from lowbit.sequential import CHUNK_TOKENS, shared_input_groups
from lowbit.tensor import rtn_dequantized, storage_bytes

log = logging.getLogger(__name__)

# 2 bits is left out by default: on the default model (RTN, int asym g128, 2026-11-27) every plan that put even
# 10 of 210 modules at 2 bits had a worse KL than uniform int3 at the same size — the summed output error does
# not see how a 2-bit module's damage grows through the layers after it. Pass bits=(2, 3, 4, 8) to allow it.
DEFAULT_BITS: tuple[int, ...] = (3, 4, 8)
Measure = Literal["rtn", "gptq"]
Weighting = Literal["output", "fisher"]
GroupSizes = Sequence[int] | Literal["auto"] | None
SMALLEST_AUTO_GROUP = 32


def auto_group_sizes(base: QuantSpec) -> tuple[int, ...] | None:
    """The group sizes the planner offers by default: the scheme's own and its halves down to 32 (g128: 128,
    64, 32), so a module can buy accuracy with more scales as well as with more bits, never with larger
    groups than the scheme asked for (a format's constraints on the group size hold for smaller ones too);
    None for a scheme without groups (its granularity is kept). On the default model, at 3.3 and 3.5 bits per
    weight, these candidates with Fisher-weighted errors give plans with lower KL than uniform int3 in groups
    of 64 and 32 at as many or more bits; bits alone do not (bench/results/planner.md)."""
    if base.granularity != "group" or not base.group_size:
        return None
    sizes, g = [], int(base.group_size)
    while g >= SMALLEST_AUTO_GROUP and g % 8 == 0:
        sizes.append(g)
        g //= 2
    return tuple(sizes) or (int(base.group_size),)


# -- candidates and sizes ------------------------------------------------------------------------

def candidate_specs(base: QuantSpec, bits: Sequence[int] = DEFAULT_BITS,
                    group_sizes: GroupSizes = None) -> tuple[QuantSpec, ...]:
    """The base integer spec at each bit width (same symmetry and observer), cheapest first.

    With ``group_sizes`` every width is also offered at each of those group sizes (``0`` meaning one
    scale per output channel), so the plan can buy accuracy with smaller groups as well as with more
    bits: at about 3.3 bits per weight, int3 in groups of 64 is a better use of the bytes than a mix
    of int3 and int4 in groups of 128 on the default model (bench/results/planner.md). ``"auto"`` is
    `auto_group_sizes`; without any, the base spec's own granularity is kept."""
    if base.format != "int":
        raise LowbitError(f"the bit planner varies integer bit widths; the scheme's weights are {base.format}.")
    widths = sorted(set(bits))
    if not widths:
        raise LowbitError("the bit planner needs at least one candidate bit width.")
    if group_sizes == "auto":
        group_sizes = auto_group_sizes(base)
    if not group_sizes:
        return tuple(base.replace(bits=int(b)) for b in widths)
    if any(g < 0 for g in group_sizes):
        raise LowbitError(f"candidate group sizes must be positive (or 0 for per-channel), got {list(group_sizes)}.")
    layouts = sorted(set(group_sizes), key=lambda g: -(g or math.inf))  # largest groups (fewest scales) first
    return tuple(base.replace(bits=int(b), granularity="group", group_size=g) if g
                 else base.replace(bits=int(b), granularity="channel", group_size=None)
                 for b in widths for g in layouts)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_budget(text: str | int) -> int:
    """Bytes from ``35GB``, ``500MB``, ``1.5GiB`` or a plain number of bytes (GB = 10⁹ bytes, as `lowbit size`)."""
    if isinstance(text, int) and not isinstance(text, bool):
        count = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
        if match is None or match.group(2).upper() not in _UNITS:
            raise LowbitError(f"--budget {text!r} is not a size (bytes, or e.g. 500MB, 35GB, 1.5GiB).")
        count = int(Fraction(match.group(1)) * _UNITS[match.group(2).upper()])
    if count <= 0:
        raise LowbitError(f"--budget must be positive, got {text!r}.")
    return count


@dataclass(frozen=True)
class SizeTarget:
    """What the plan must fit: bits per quantised weight, or total weight bytes (one of the two)."""

    bits_per_weight: float | None = None
    total_bytes: int | None = None

    def __post_init__(self) -> None:
        if (self.bits_per_weight is None) == (self.total_bytes is None):
            raise LowbitError("give the planner exactly one target: --target-bpw or --budget.")
        if self.bits_per_weight is not None and not (math.isfinite(self.bits_per_weight) and self.bits_per_weight > 0):
            raise LowbitError(f"--target-bpw must be a positive number, got {self.bits_per_weight!r}.")

    def linear_bytes(self, quantized_params: int, float_bytes: int) -> int:
        """The most bytes the quantised linears may take: ``8·bytes / params ≤ target`` exactly, or the
        total budget less the float tensors."""
        if self.bits_per_weight is not None:
            return math.floor(Fraction(str(self.bits_per_weight)) * quantized_params / 8)
        return int(self.total_bytes) - float_bytes  # type: ignore[arg-type]

    def describe(self) -> str:
        if self.bits_per_weight is not None:
            return f"--target-bpw {self.bits_per_weight:g}"
        return f"--budget {self.total_bytes:,} bytes"


def check_reachable(target: SizeTarget, shapes: dict[str, tuple[int, int]], specs: Sequence[QuantSpec],
                    float_bytes: int, g_idx: bool = False) -> int:
    """The linears' byte budget for ``target``, or a LowbitError when no allocation reaches it: below every
    module at the fewest bits, or above every module at the most (then a uniform scheme is the answer)."""
    params = sum(r * c for r, c in shapes.values())
    budget = target.linear_bytes(params, float_bytes)
    low = sum(min(spec_bytes(s, shape, g_idx) for s in specs) for shape in shapes.values())
    high = sum(max(spec_bytes(s, shape, g_idx) for s in specs) for shape in shapes.values())

    def say(nbytes: int) -> str:
        if target.bits_per_weight is not None:
            return f"{8 * nbytes / params:.4f} bits per weight"
        return f"{nbytes + float_bytes:,} bytes in all"

    if budget < low:
        raise LowbitError(f"{target.describe()} is below {say(low)}, what every module at "
                          f"{specs[0].describe()} takes; lower the fewest candidate bits or raise the target.")
    if budget >= high:
        raise LowbitError(f"{target.describe()} is above {say(high)}, what every module at "
                          f"{specs[-1].describe()} takes; there is nothing to plan (use that scheme).")
    return budget


def spec_bytes(spec: QuantSpec, shape: tuple[int, int], g_idx: bool = False) -> int:
    """`storage_bytes` of one candidate; ``g_idx`` (GPTQ's act-order without static groups) is stored only
    by grouped specs."""
    return storage_bytes(spec, shape, g_idx and spec.granularity == "group")


# -- 1. sensitivities ----------------------------------------------------------------------------

@dataclass
class Sensitivities:
    """Per module: its shape and, for each candidate spec (in `specs` order), its output error."""

    specs: tuple[QuantSpec, ...]
    shapes: dict[str, tuple[int, int]]
    errors: dict[str, list[float]]
    signal: dict[str, float] = field(default_factory=dict)  # ‖WXᵀ‖² / n, what the errors compare with
    measured_with: str = "rtn"
    calibration_tokens: int = 0


def _errors_of(group: list[str], weights: dict[str, Tensor], H: Tensor, specs: Sequence[QuantSpec],
               measure: Measure, gptq: GPTQ, fisher: dict[str, Tensor] | None = None) -> dict[str, list[float]]:
    """Each weight's output error at each candidate spec, given the group's shared Hessian H (C, C); with
    ``fisher``, each output channel's error weighted by its Fisher weight (see `output_fisher`)."""
    out: dict[str, list[float]] = {name: [] for name in group}
    factor = gptq_factor(H, gptq.damp, gptq.act_order, f"{group[0]}.weight") if measure == "gptq" else None
    for spec in specs:
        if factor is not None:  # one factorisation of H for every candidate spec
            results = gptq_solve_group(factor, [weights[n] for n in group], spec, gptq.block_size, gptq.static_groups,
                                       [f"{n}.weight" for n in group])
            for name, result in zip(group, results):
                if fisher is None:
                    out[name].append(result.error)
                else:
                    out[name].append(output_error(weights[name], result.weight.dequantize(), H, fisher[name]))
        else:
            for name in group:
                Q = rtn_dequantized(weights[name], spec, name=f"{name}.weight")
                out[name].append(output_error(weights[name], Q, H, None if fisher is None else fisher[name]))
    return out


def output_fisher(model: nn.Module, linears: dict[str, nn.Module], calib: Tensor, batch: int,
                  progress: bool = True) -> dict[str, Tensor]:
    """Per output channel of each linear, the mean over calibration tokens of (∂L/∂y_j)², L the model's
    next-token cross-entropy: the diagonal empirical Fisher of the linear's output.

    With it, ``Σ_j F_j·E[(ΔW x)_j²] / 2`` estimates the loss a weight error ΔW adds (the second-order
    term of L around the float model, channels and tokens taken as independent), where the plain
    ``‖ΔW Xᵀ‖²`` treats a unit of error in every module's output as equally harmful. That matters
    across modules: a down projection writing into a residual stream with massive activations shows
    large output errors that the next RMSNorm scales away. The Fisher as a sensitivity is HAWQ's and
    SqueezeLLM's idea (Dong et al., arXiv 1911.03852; Kim et al., arXiv 2306.07629), here on outputs so
    that it combines with each candidate's exact output error. One forward and backward of the float
    model per ``batch`` sequences; parameters get no gradients (only activations do)."""
    sums = {name: torch.zeros(m.out_features, dtype=torch.float64) for name, m in linears.items()}
    tokens = 0

    def keep(name: str):
        def hook(module: nn.Module, grad_input: Any, grad_output: tuple[Tensor, ...]) -> None:
            g = grad_output[0].detach().float()
            sums[name] += g.reshape(-1, g.shape[-1]).square().sum(0, dtype=torch.float64)
        return hook

    flags = {p: p.requires_grad for p in model.parameters()}
    embed = model.get_input_embeddings()
    handles = [m.register_full_backward_hook(keep(n)) for n, m in linears.items()]
    handles.append(embed.register_forward_hook(lambda module, args, output: output.requires_grad_()))
    was_training = model.training
    try:
        for p in flags:
            p.requires_grad_(False)
        model.eval()
        starts = range(0, calib.shape[0], batch)
        for start in tqdm(starts, desc="Fisher weights", unit="batch", disable=None if progress else True):
            ids = calib[start : start + batch]
            with torch.enable_grad():
                out = model(ids, labels=ids)
                # the mean loss over the batch's predicted tokens, times their count: the sum of per-token losses
                n = ids.shape[0] * (ids.shape[1] - 1)
                (out.loss * n).backward()
            tokens += n
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return {name: (s / max(tokens, 1)).float() for name, s in sums.items()}


def measure_sensitivities(model: nn.Module, scheme: Scheme, calib: Tensor, specs: Sequence[QuantSpec],
                          measure: Measure = "rtn", gptq: GPTQ | None = None, progress: bool = True,
                          weighting: Weighting = "output") -> Sensitivities:
    """Run ``calib`` (N, T) through the float ``model`` one decoder layer at a time; for each linear the
    scheme selects, its input Hessian and its output error at every spec in ``specs``.

    The model is not changed. Linears that read the same input (q/k/v, gate/up) share one Hessian,
    gathered once on the first of them. A linear the calibration data never reaches gets its plain
    weight error ‖W − Q‖² (H = I): it is still planned, just without activation weighting.
    """
    if measure not in ("rtn", "gptq"):
        raise LowbitError(f"sensitivities are measured with rtn or gptq, not {measure!r}.")
    if weighting not in ("output", "fisher"):
        raise LowbitError(f"sensitivities are weighted by output or fisher, not {weighting!r}.")
    gptq = gptq or GPTQ()
    selected = select_linears(model, scheme.targets, scheme.ignore)
    if not selected:
        raise LowbitError(f"scheme {scheme.name} selects no linear layer of {type(model).__name__}.")
    result = Sensitivities(tuple(specs), {n: (m.out_features, m.in_features) for n, m in selected.items()}, {},
                           measured_with=measure if weighting == "output" else f"{measure}, Fisher-weighted")
    batch = max(1, CHUNK_TOKENS // max(1, calib.shape[1]))
    # one sequence per backward pass: autograd keeps every layer's activations (and the logits) of the batch,
    # 14 GB at 8 × 512 tokens on the default model
    fisher = output_fisher(model, selected, calib, 1, progress) if weighting == "fisher" else None
    name, layers, inputs = capture_first_layer_inputs(model, calib, batch)
    _, _, probe = capture_first_layer_inputs(model, calib[:1, :16], 1)
    result.calibration_tokens = inputs.tokens
    bar = tqdm(range(len(layers)), desc=f"sensitivities ({measure})", unit="layer", disable=None if progress else True)
    for i in bar:
        prefix = f"{name}.{i}."
        linears = {n[len(prefix):]: m for n, m in selected.items() if n.startswith(prefix)}
        groups = shared_input_groups(layers[i], probe, linears)  # q/k/v, gate/up: one Hessian each
        grouped = {local for group in groups for local in group}
        groups += [[local] for local in linears if local not in grouped]
        stats, outputs = collect(layers[i], inputs, {g[0]: linears[g[0]] for g in groups},
                                 lambda m: HessianAccumulator.zeros(m.in_features))
        for group in groups:
            acc = stats[group[0]]
            assert isinstance(acc, HessianAccumulator)
            if not acc.count:
                continue
            H = acc.hessian()
            weights = {prefix + n: linears[n].weight.detach().float() for n in group}
            result.errors.update(_errors_of(list(weights), weights, H, specs, measure, gptq, fisher))
            for full, W in weights.items():
                result.signal[full] = output_error(W, None, H, None if fisher is None else fisher[full])
        inputs = LayerInputs(outputs, inputs.kwargs)
        probe = LayerInputs(run_layer(layers[i], probe), probe.kwargs)
    for full in selected:  # never reached by the calibration data: unweighted error
        if full not in result.errors:
            log.warning("%s never saw calibration data; its sensitivity is its plain weight error", full)
            W = selected[full].weight.detach().float()
            result.errors[full] = _errors_of([full], {full: W}, 2.0 * torch.eye(W.shape[1]), specs, "rtn", gptq,
                                            fisher)[full]
    return result


# -- 2. allocation -------------------------------------------------------------------------------

def _hull(costs: Sequence[int], errors: Sequence[float]) -> list[int]:
    """Indices of the options on the lower convex hull of (cost, error), cheapest first: the options a
    Lagrangian price on bytes can select. Dominated options (dearer and no better) are left out."""
    order = sorted(range(len(costs)), key=lambda j: (costs[j], errors[j]))
    frontier: list[int] = []
    for j in order:  # strictly decreasing error with increasing cost
        if not frontier or errors[j] < errors[frontier[-1]]:
            if frontier and costs[j] == costs[frontier[-1]]:
                frontier.pop()
            frontier.append(j)
    hull: list[int] = []
    for j in frontier:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment a → j: remove it (its slope does not decrease)
            if (errors[a] - errors[b]) * (costs[j] - costs[b]) <= (errors[b] - errors[j]) * (costs[b] - costs[a]):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def _improve(choice: list[int], costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]],
             budget: int, max_rounds: int) -> list[int]:
    """Local search from ``choice``: apply the best single move (one module to another option) or pair of
    moves (two modules at once) that lowers the total error within the budget, until none does."""
    n = len(costs)
    for _ in range(max_rounds):
        spent = sum(costs[i][choice[i]] for i in range(n))
        item, dc, de = [], [], []
        for i in range(n):
            for j in range(len(costs[i])):
                if j != choice[i]:
                    item.append(i)
                    dc.append(costs[i][j] - costs[i][choice[i]])
                    de.append(errors[i][j] - errors[i][choice[i]])
        if not item:
            return choice
        moves = np.arange(len(item))
        to = np.array([j for i in range(n) for j in range(len(costs[i])) if j != choice[i]])
        it, c, e = np.array(item), np.array(dc, dtype=np.int64), np.array(de, dtype=np.float64)
        slack = budget - spent
        best_gain, best = 0.0, None
        single = np.where(c <= slack, e, np.inf)
        k = int(np.argmin(single))
        if single[k] < 0:
            best_gain, best = float(single[k]), (k,)
        pair_e = e[:, None] + e[None, :]
        ok = (c[:, None] + c[None, :] <= slack) & (it[:, None] != it[None, :])
        pair_e = np.where(ok, pair_e, np.inf)
        flat = int(np.argmin(pair_e))
        a, b = divmod(flat, len(moves))
        # a pair must beat the best single move by a margin, or float noise could cycle
        if pair_e[a, b] < best_gain - 1e-12 * max(1.0, abs(best_gain)):
            best = (a, b)
        if best is None:
            return choice
        for k in best:
            choice[int(it[k])] = int(to[k])
    log.warning("bit allocation: local search stopped after %d rounds", max_rounds)
    return choice


def _allocate_exact(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int,
                    unit: int) -> list[int]:
    """Dynamic programming over the budget in units of ``unit`` bytes (which divides every cost):
    best[c] = least error of the items so far within c units. Exact; memory items × budget/unit bytes."""
    n, size = len(costs), budget // unit + 1
    best = np.zeros(size)
    picks = np.empty((n, size), dtype=np.int8)
    for i in range(n):
        options = np.full((len(costs[i]), size), np.inf)
        for j, (c, e) in enumerate(zip(costs[i], errors[i])):
            c //= unit
            if c < size:
                options[j, c:] = best[: size - c] + e
        picks[i] = np.argmin(options, axis=0)
        best = options[picks[i], np.arange(size)]
    left, choice = size - 1, [0] * n
    for i in reversed(range(n)):
        choice[i] = int(picks[i, left])
        left -= costs[i][choice[i]] // unit
    return choice


def _allocate_greedy(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int) -> list[int]:
    """The Lagrangian (LP) greedy along each item's convex hull, then `_improve`. Its error is at most the
    optimum's plus the largest error range of one item: it differs from the LP optimum, a lower bound,
    by at most one item's partial step."""
    n = len(costs)
    hulls = [_hull(costs[i], errors[i]) for i in range(n)]
    position = [0] * n  # index into each hull
    spent = sum(costs[i][hulls[i][0]] for i in range(n))

    def step(i: int) -> tuple[float, int, int] | None:  # (−error saved per byte, item, its next position)
        p = position[i]
        if p + 1 >= len(hulls[i]):
            return None
        a, b = hulls[i][p], hulls[i][p + 1]
        return (-(errors[i][a] - errors[i][b]) / (costs[i][b] - costs[i][a]), i, p + 1)

    heap = [s for s in (step(i) for i in range(n)) if s is not None]
    heapq.heapify(heap)
    while heap:  # hull slopes decrease along each hull, so an item's steps come out in order
        _, i, p = heapq.heappop(heap)
        extra = costs[i][hulls[i][p]] - costs[i][hulls[i][p - 1]]
        if spent + extra > budget:
            continue  # this item stops here; cheaper steps of other items may still fit
        spent += extra
        position[i] = p
        nxt = step(i)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    choice = [hulls[i][position[i]] for i in range(n)]
    return _improve(choice, costs, errors, budget, max_rounds=10 * n + 10)


EXACT_CELLS = 2 * 10**8  # items × budget units the exact solver may use (bytes of back-pointers)


def allocate(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int,
             exact_cells: int = EXACT_CELLS) -> list[int]:
    """One option per item minimising Σ errors[i][choice[i]] subject to Σ costs[i][choice[i]] ≤ budget.

    A multiple-choice knapsack. Item costs of real models share a large common divisor (rows come in
    multiples of 64 or more), so the budget is usually a few hundred thousand units of it, and dynamic
    programming over it is exact and quick (`_allocate_exact`). Above ``exact_cells`` items × units the
    Lagrangian greedy with local search (`_allocate_greedy`) is used: with that many modules, its bound
    — one module's error range — is a small part of the total. Raises a LowbitError if even the
    cheapest options exceed the budget.
    """
    n = len(costs)
    if n != len(errors) or any(len(c) != len(e) or not c for c, e in zip(costs, errors)):
        raise LowbitError("allocate needs one non-empty list of costs and of errors per item, of equal lengths.")
    if any(len(c) > 127 for c in costs):
        raise LowbitError("allocate handles at most 127 options per item.")
    cheapest = sum(min(c) for c in costs)
    if cheapest > budget:
        raise LowbitError(f"the cheapest options take {cheapest:,} bytes, more than the budget of {budget:,}.")
    unit = math.gcd(*(int(c) for row in costs for c in row)) or 1
    if n * (budget // unit + 1) <= exact_cells:
        return _allocate_exact(costs, errors, budget, unit)
    log.info("bit allocation: %d items × %d units is too large for the exact solver; greedy", n, budget // unit)
    return _allocate_greedy(costs, errors, budget)


# -- 3. the plan ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlanRow:
    """One module's choice: its spec, the output error measured at it, and its stored bytes."""

    module: str
    shape: tuple[int, int]
    spec: QuantSpec
    error: float  # tr((W − Q) H (W − Q)ᵀ) / 2 at this spec
    relative_error: float  # error / (‖WXᵀ‖² / n); 0 when the module saw no calibration data
    nbytes: int  # exactly what `lowbit.tensor.storage_bytes` counts

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "shape": list(self.shape), "bits": self.spec.bits,
                "spec": self.spec.to_dict(), "error": self.error, "relative_error": self.relative_error,
                "bytes": self.nbytes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanRow:
        return cls(str(data["module"]), (int(data["shape"][0]), int(data["shape"][1])),
                   QuantSpec.from_dict(data["spec"]), float(data["error"]), float(data["relative_error"]),
                   int(data["bytes"]))


@dataclass(frozen=True)
class BitPlan:
    """The chosen spec of every module, the mixed scheme that applies it, and what it costs.

    `lowbit.quantize` takes a BitPlan in place of a scheme, and writes ``to_dict()`` into the
    checkpoint (``details.bit_plan`` of a native checkpoint's ``lowbit.json``).
    """

    scheme: Scheme
    rows: tuple[PlanRow, ...]
    target: SizeTarget
    linear_budget: int  # bytes the quantised linears were allowed
    float_bytes: int  # every other tensor, at 2 bytes each (as `lowbit size` counts them)
    measured_with: str
    calibration_tokens: int
    seconds: float = 0.0  # measuring the sensitivities and allocating (0 when not measured here)

    @property
    def quantized_bytes(self) -> int:
        return sum(r.nbytes for r in self.rows)

    @property
    def quantized_params(self) -> int:
        return sum(r.shape[0] * r.shape[1] for r in self.rows)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.quantized_bytes / self.quantized_params

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.float_bytes

    @property
    def total_error(self) -> float:
        return sum(r.error for r in self.rows)

    def bits_histogram(self) -> dict[int, int]:
        """How many modules got each bit width."""
        counts: dict[int, int] = {}
        for row in self.rows:
            counts[row.spec.bits] = counts.get(row.spec.bits, 0) + 1
        return dict(sorted(counts.items()))

    def spec_histogram(self) -> dict[str, int]:
        """How many modules got each spec (bits and group size), in the order of first appearance."""
        counts: dict[str, int] = {}
        for row in self.rows:
            key = row.spec.describe()
            counts[key] = counts.get(key, 0) + 1
        return counts

    def to_dict(self, scheme: bool = True) -> dict[str, Any]:
        """The plan as JSON; without its mixed scheme where that is stored beside it (``scheme=False``:
        `lowbit.quantize`'s details, whose info holds the scheme; `read_plan` takes it from there)."""
        out = {"target_bpw": self.target.bits_per_weight, "budget_bytes": self.target.total_bytes,
                "linear_budget_bytes": self.linear_budget, "bits_per_weight": self.bits_per_weight,
                "quantized_bytes": self.quantized_bytes, "quantized_params": self.quantized_params,
                "float_bytes": self.float_bytes, "weight_bytes": self.total_bytes, "total_error": self.total_error,
                "bits_histogram": {str(k): v for k, v in self.bits_histogram().items()},
                "spec_histogram": self.spec_histogram(),
                "measured_with": self.measured_with, "calibration_tokens": self.calibration_tokens,
                "seconds": self.seconds, "modules": [r.to_dict() for r in self.rows]}
        return {**out, "scheme": self.scheme.to_dict()} if scheme else out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BitPlan:
        try:
            return cls(Scheme.from_dict(data["scheme"]), tuple(PlanRow.from_dict(r) for r in data["modules"]),
                       SizeTarget(data.get("target_bpw"), data.get("budget_bytes")), int(data["linear_budget_bytes"]),
                       int(data["float_bytes"]), str(data["measured_with"]), int(data["calibration_tokens"]),
                       float(data.get("seconds", 0.0)))
        except (KeyError, TypeError, ValueError, IndexError) as err:
            if isinstance(err, LowbitError):
                raise
            raise LowbitError(f"not a bit plan ({type(err).__name__}: {err}).") from err


def float_tensor_bytes(model: nn.Module, quantized: Sequence[str], float_bytes: int = 2) -> int:
    """Bytes of every parameter except the weights of the ``quantized`` linears, tied ones once, at
    ``float_bytes`` each: what `lowbit.footprint.model_footprint` counts for them once they are quantised."""
    skip = {model.get_submodule(n).weight.data_ptr() for n in quantized}
    seen: set[int] = set()
    params = 0
    for param in model.parameters():
        ptr = param.data_ptr()
        if ptr in seen or ptr in skip:
            continue
        seen.add(ptr)
        params += param.numel()
    return params * float_bytes


def plan_from_sensitivities(sens: Sensitivities, scheme: Scheme, target: SizeTarget, float_bytes: int,
                            g_idx: bool = False) -> BitPlan:
    """Allocate bits for ``target`` from measured sensitivities; the mixed scheme keeps ``scheme``'s targets,
    ignore patterns and activations."""
    names = list(sens.shapes)
    budget = check_reachable(target, sens.shapes, sens.specs, float_bytes, g_idx)
    costs = [[spec_bytes(s, sens.shapes[n], g_idx) for s in sens.specs] for n in names]
    errors = [sens.errors[n] for n in names]
    choice = allocate(costs, errors, budget)
    rows = []
    for i, (n, j) in enumerate(zip(names, choice)):
        signal = sens.signal.get(n, 0.0)
        rows.append(PlanRow(n, sens.shapes[n], sens.specs[j], errors[i][j], errors[i][j] / signal if signal else 0.0,
                            costs[i][j]))
    label = f"{target.bits_per_weight:g}bpw" if target.bits_per_weight is not None else f"{target.total_bytes}B"
    mixed = scheme.replace(per_module=tuple((r.module, r.spec) for r in rows), name=f"{scheme.name}-plan-{label}")
    return BitPlan(mixed, tuple(rows), target, budget, float_bytes, sens.measured_with, sens.calibration_tokens)


def plan_bits(model: nn.Module, scheme: Scheme, calib: Tensor, target_bpw: float | None = None,
              budget: int | str | None = None, bits: Sequence[int] = DEFAULT_BITS, method: Any = None,
              measure: Measure | None = None, progress: bool = True,
              group_sizes: GroupSizes = "auto", weighting: Weighting = "fisher") -> BitPlan:
    """Measure ``model``'s sensitivities on ``calib`` and choose each selected linear's bits (among ``bits``,
    with the symmetry of ``scheme.weights``, at each of ``group_sizes``: by default the scheme's group size
    and its halves down to 32, `auto_group_sizes`; None keeps the scheme's) for ``target_bpw`` bits per
    quantised weight or a total weight ``budget`` (bytes or e.g. "35GB"). Quantise with
    ``lowbit.quantize(model, plan, method)``.

    Module errors are weighted by the loss's Fisher on each output channel (``weighting="fisher"``,
    `output_fisher`: one forward and backward of the float model per calibration sequence) unless
    ``weighting="output"`` asks for plain output errors (no backward pass; worse plans on the default
    model, bench/results/planner.md).

    ``method`` is the method that will quantise (RTN by default, or a `GPTQ`): the candidates are measured
    the way it rounds (``measure``, by default "gptq" for GPTQ, else "rtn"), and the g_idx that GPTQ's
    act-order without static groups stores is counted in the budget.
    """
    target = SizeTarget(target_bpw, None if budget is None else parse_budget(budget))
    if scheme.lm_head is not None:  # its bytes would be left out of the budget
        raise LowbitError(f"the bit planner leaves lm_head float; scheme {scheme.name} quantises it.")
    specs = candidate_specs(scheme.weights, bits, group_sizes)
    gptq = method if isinstance(method, GPTQ) else None
    measure = measure or ("gptq" if gptq is not None else "rtn")
    selected = select_linears(model, scheme.targets, scheme.ignore)
    if not selected:
        raise LowbitError(f"scheme {scheme.name} selects no linear layer of {type(model).__name__}.")
    g_idx = gptq is not None and gptq.act_order and not gptq.static_groups
    floats = float_tensor_bytes(model, list(selected))
    shapes = {n: (m.out_features, m.in_features) for n, m in selected.items()}
    check_reachable(target, shapes, specs, floats, g_idx)  # before the calibration pass
    start = time.perf_counter()
    sens = measure_sensitivities(model, scheme, calib, specs, measure, gptq, progress, weighting)
    plan = plan_from_sensitivities(sens, scheme, target, floats, g_idx)
    return replace(plan, seconds=time.perf_counter() - start)


def read_plan(path: str | Path) -> BitPlan:
    """The bit plan kept in a native checkpoint (its directory or ``lowbit.json``) or in a
    ``lowbit quantize --json`` report of a planned run."""
    file = Path(path)
    if file.is_dir():
        file = file / "lowbit.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LowbitError(f"'{file}' is not a readable JSON file ({err}).") from err
    plan = data.get("details", {}).get("bit_plan") if isinstance(data, dict) and isinstance(
        data.get("details"), dict) else None
    if plan is None and isinstance(data, dict) and "modules" in data and "scheme" in data:
        plan = data
    if not isinstance(plan, dict):
        raise LowbitError(f"'{file}' holds no bit plan (a checkpoint or report of a --target-bpw / --budget run).")
    if "scheme" not in plan and isinstance(data.get("scheme"), dict):  # kept once, beside the plan
        plan = {**plan, "scheme": data["scheme"]}
    try:
        return BitPlan.from_dict(plan)
    except LowbitError as err:
        raise LowbitError(f"'{file}': {err}") from err
