"""What to quantise and to which number format: `QuantSpec`, `Scheme` and the presets.

Both are frozen dataclasses that round-trip through `to_dict()` / `from_dict()`, so the
exact configuration is written into every checkpoint and report.

Formats (see `lowbit.formats`):
- ``int``: uniform affine integers, 2–8 bits, symmetric (z = 0) or asymmetric.
- ``nf4``: 4-bit NormalFloat lookup (QLoRA, arXiv 2305.14314), absmax scales per block,
  optionally double-quantised.
- ``fp4``: 4-bit e2m1 minifloat lookup with absmax scales.
- ``fp8_e4m3`` / ``fp8_e5m2``: 8-bit floats with absmax scales.

Granularity: ``tensor`` (one scale), ``channel`` (one per output row), ``group`` (one per
``group_size`` consecutive input columns of a row; the last group of a row may be
smaller), ``token`` (activations: one per row of the activation matrix).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lowbit.errors import LowbitError

Format = Literal["int", "nf4", "fp4", "fp8_e4m3", "fp8_e5m2"]
Granularity = Literal["tensor", "channel", "group", "token"]
Observer = Literal["minmax", "percentile", "mse"]

FORMATS: tuple[str, ...] = ("int", "nf4", "fp4", "fp8_e4m3", "fp8_e5m2")
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group", "token")
OBSERVERS: tuple[str, ...] = ("minmax", "percentile", "mse")
SCALE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
_FIXED_BITS = {"nf4": 4, "fp4": 4, "fp8_e4m3": 8, "fp8_e5m2": 8}


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantised.

    Args:
        format: the number format (``int``, ``nf4``, ``fp4``, ``fp8_e4m3``, ``fp8_e5m2``).
        bits: code width; only free for ``int`` (2–8), implied by the other formats.
        granularity: ``tensor``, ``channel``, ``group`` or ``token``.
        group_size: columns per group when granularity is ``group``.
        symmetric: ``int`` only; symmetric codes have no zero point.
        observer: how the range of a group is chosen: ``minmax``, ``percentile``
            (clip at ``percentile`` and ``1 - percentile``) or ``mse`` (search the
            clipping ratio with the least reconstruction error).
        scale_dtype: storage dtype of the scales (``float16``, ``bfloat16``, ``float32``).
        double_quant: ``nf4`` only; quantise the block scales to int8 (QLoRA §3).
        dynamic: activations only; scales computed per forward pass.
    """

    format: Format = "int"
    bits: int = 8
    granularity: Granularity = "channel"
    group_size: int | None = None
    symmetric: bool = True
    observer: Observer = "minmax"
    percentile: float = 0.999
    scale_dtype: str = "float16"
    double_quant: bool = False
    dynamic: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise LowbitError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}.")
        if self.format in _FIXED_BITS and self.bits != _FIXED_BITS[self.format]:
            # The bits of a fixed-width format are implied; normalise instead of refusing.
            object.__setattr__(self, "bits", _FIXED_BITS[self.format])
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise LowbitError(f"bits must be an integer from 2 to 8, got {self.bits!r}.")
        if self.granularity not in GRANULARITIES:
            raise LowbitError(
                f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}."
            )
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size <= 0:
                raise LowbitError(f"group size must be a positive integer, got {self.group_size!r}.")
        elif self.group_size is not None:
            raise LowbitError(f"group_size is only meaningful with granularity 'group', not {self.granularity!r}.")
        if self.observer not in OBSERVERS:
            raise LowbitError(f"observer must be one of {', '.join(OBSERVERS)}, got {self.observer!r}.")
        if not 0.5 < self.percentile <= 1.0:
            raise LowbitError(f"percentile must lie in (0.5, 1], got {self.percentile!r}.")
        if self.scale_dtype not in SCALE_DTYPES:
            raise LowbitError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {self.scale_dtype!r}.")
        if self.double_quant and self.format != "nf4":
            raise LowbitError("double_quant applies to the nf4 format only.")
        if self.format != "int" and not self.symmetric:
            raise LowbitError(f"format {self.format!r} is symmetric by construction; asymmetric applies to int only.")

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def group_size_for(self, cols: int, rows: int = 1) -> int:
        """The group size along the input dimension for a (rows, cols) tensor."""
        if self.granularity == "group":
            return int(self.group_size)  # type: ignore[arg-type]
        if self.granularity == "tensor":
            return rows * cols
        return cols

    def describe(self) -> str:
        if self.format == "int":
            kind = f"int{self.bits} {'sym' if self.symmetric else 'asym'}"
        else:
            kind = self.format
        where = f"g{self.group_size}" if self.granularity == "group" else f"per-{self.granularity}"
        return f"{kind} {where}"

    def replace(self, **changes: Any) -> QuantSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise LowbitError(f"unknown QuantSpec field(s): {', '.join(sorted(unknown))}.")
        return cls(**data)


@dataclass(frozen=True)
class Scheme:
    """Which linear layers to quantise and how.

    ``targets`` and ``ignore`` are regular expressions matched (``re.fullmatch``) against
    module names such as ``model.layers.3.mlp.down_proj``; a linear layer is quantised
    when some target matches and no ignore pattern does. Embeddings are never linear
    layers, and ``lm_head`` is ignored by default, as in every serving format.

    ``lm_head`` (None: float) quantises the output projection too, weight-only and by
    round-to-nearest whatever the method, after the decoder layers; a tied one is untied
    (the input embedding stays float). Decoding a small model reads the head once per token,
    so it is a large share of the time: on the default model its float32 GEMV is a third of
    W4A16's decode step. See `LM_HEAD_SPECS` for the names the CLI takes.
    """

    weights: QuantSpec
    activations: QuantSpec | None = None
    targets: tuple[str, ...] = (r".*",)
    ignore: tuple[str, ...] = (r"(.*\.)?lm_head",)
    name: str = "custom"
    # A mixed scheme (`lowbit.planner`): (module name, weight spec) pairs that replace ``weights``
    # for those exact modules; every other selected module keeps ``weights``.
    per_module: tuple[tuple[str, QuantSpec], ...] = ()
    lm_head: QuantSpec | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        object.__setattr__(self, "per_module", tuple((str(n), s) for n, s in dict(self.per_module).items()))
        if self.activations is not None and self.activations.format in ("nf4", "fp4"):
            raise LowbitError("activations can be quantised to int or fp8 formats only.")
        if self.activations is not None and not self.activations.symmetric:
            raise LowbitError("asymmetric activation quantisation is not supported; use symmetric.")
        if self.lm_head is not None and (self.lm_head.dynamic or self.lm_head.granularity == "token"):
            raise LowbitError("a scheme's lm_head spec is a weight spec; per-token / dynamic specs are for "
                              "activations.")

    def replace(self, **changes: Any) -> Scheme:
        return dataclasses.replace(self, **changes)

    def spec_for(self, module: str) -> QuantSpec:
        """The weight spec of the module named ``module`` (its own in a mixed scheme, else ``weights``)."""
        for name, spec in self.per_module:
            if name == module:
                return spec
        return self.weights

    def describe(self) -> str:
        act = f", activations {self.activations.describe()}" if self.activations else ""
        if self.lm_head is not None:
            act += f", lm_head {self.lm_head.describe()}"
        if self.per_module:
            kinds = sorted({s.describe() for _, s in self.per_module})
            return f"{self.name}: mixed weights ({', '.join(kinds)}; {len(self.per_module)} modules set){act}"
        return f"{self.name}: weights {self.weights.describe()}{act}"

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "weights": self.weights.to_dict(),
            "activations": self.activations.to_dict() if self.activations else None,
            "targets": list(self.targets),
            "ignore": list(self.ignore),
        }
        if self.per_module:  # only mixed schemes carry it: uniform schemes' dicts stay as they were
            out["per_module"] = {name: spec.to_dict() for name, spec in self.per_module}
        if self.lm_head is not None:  # likewise only where set
            out["lm_head"] = self.lm_head.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scheme:
        act = data.get("activations")
        head = data.get("lm_head")
        per_module = data.get("per_module") or {}
        if not isinstance(per_module, dict):
            raise LowbitError("a scheme's per_module must map module names to weight specs.")
        return cls(
            weights=QuantSpec.from_dict(data["weights"]),
            activations=QuantSpec.from_dict(act) if act else None,
            targets=tuple(data.get("targets", (r".*",))),
            ignore=tuple(data.get("ignore", ())),
            name=data.get("name", "custom"),
            per_module=tuple((name, QuantSpec.from_dict(spec)) for name, spec in per_module.items()),
            lm_head=QuantSpec.from_dict(head) if head else None,
        )


def _int(bits: int, group: int | None, symmetric: bool = True) -> QuantSpec:
    if group is None:
        return QuantSpec("int", bits, "channel", None, symmetric)
    return QuantSpec("int", bits, "group", group, symmetric)


_DYNAMIC_INT8 = QuantSpec("int", 8, "token", dynamic=True, scale_dtype="float32")
_DYNAMIC_FP8 = QuantSpec("fp8_e4m3", 8, "token", dynamic=True, scale_dtype="float32")

W4A16 = Scheme(_int(4, 128), name="W4A16")
W4A16_ASYM = Scheme(_int(4, 128, symmetric=False), name="W4A16_ASYM")
W8A16 = Scheme(_int(8, None), name="W8A16")
W8A8 = Scheme(_int(8, None), activations=_DYNAMIC_INT8, name="W8A8")
# int8 activations with one scale per tensor fixed from calibration data (SmoothQuant's static setting)
W8A8_STATIC = Scheme(_int(8, None), activations=QuantSpec("int", 8, "tensor", scale_dtype="float32"),
                     name="W8A8_STATIC")
FP8 = Scheme(QuantSpec("fp8_e4m3", 8, "channel", scale_dtype="float32"), activations=_DYNAMIC_FP8, name="FP8")
NF4 = Scheme(QuantSpec("nf4", 4, "group", 64), name="NF4")
W3A16 = Scheme(_int(3, 128, symmetric=False), name="W3A16")
W2A16 = Scheme(_int(2, 64, symmetric=False), name="W2A16")
# GGUF's 32-element block types, as lowbit schemes: a model quantised with one of these (by any method,
# GPTQ included) is written to a GGUF file losslessly (lowbit.io.gguf).
Q8_0 = Scheme(_int(8, 32), name="Q8_0")
Q4_0 = Scheme(_int(4, 32), name="Q4_0")
Q4_1 = Scheme(_int(4, 32, symmetric=False), name="Q4_1")

# What `--lm-head` names besides 'float' and 'same' (the body's own weight spec): int8 per output channel
# (on the default model W8A16's KL to FP 0.0026 without it, 0.0043 with it; bench/results/rtn.md).
LM_HEAD_SPECS: dict[str, QuantSpec] = {"int8": _int(8, None)}

PRESETS: dict[str, Scheme] = {
    s.name: s for s in (W4A16, W4A16_ASYM, W8A16, W8A8, W8A8_STATIC, FP8, NF4, W3A16, W2A16, Q8_0, Q4_0, Q4_1)
}


def get_scheme(name: str) -> Scheme:
    """A preset by name (case-insensitive), e.g. ``"W4A16"``."""
    for key, scheme in PRESETS.items():
        if key.lower() == name.lower():
            return scheme
    raise LowbitError(f"unknown scheme {name!r}; choose one of {', '.join(PRESETS)}.")


def scheme_with(
    base: Scheme,
    *,
    group_size: int | None | Literal["keep"] = "keep",
    symmetric: bool | None = None,
    bits: int | None = None,
    observer: str | None = None,
    lm_head: str | None = None,
) -> Scheme:
    """A preset with the weight spec adjusted (CLI overrides). ``group_size=0`` is refused;
    ``group_size=None`` means per channel. ``lm_head`` (None: as in ``base``): see `with_lm_head`."""
    scheme = _with_weights(base, group_size, symmetric, bits, observer)
    return scheme if lm_head is None else with_lm_head(scheme, lm_head)


def with_lm_head(base: Scheme, lm_head: str) -> Scheme:
    """``base`` with its output projection float ('float'), at ``base``'s weight spec ('same'), or at a
    spec of `LM_HEAD_SPECS` ('int8')."""
    if lm_head not in ("float", "same", *LM_HEAD_SPECS):
        raise LowbitError(f"unknown lm_head setting {lm_head!r}; choose float, same or {', '.join(LM_HEAD_SPECS)}.")
    if lm_head == "float":
        return base.replace(lm_head=None) if base.lm_head is not None else base
    spec = base.weights if lm_head == "same" else LM_HEAD_SPECS[lm_head]
    return base.replace(lm_head=spec, name=f"{base.name}+lm_head-{lm_head}")


def _with_weights(base: Scheme, group_size: int | None | Literal["keep"], symmetric: bool | None,
                  bits: int | None, observer: str | None) -> Scheme:
    spec = base.weights
    changes: dict[str, Any] = {}
    if group_size != "keep":
        if group_size is None:
            changes.update(granularity="channel", group_size=None)
        else:
            changes.update(granularity="group", group_size=group_size)
    if symmetric is not None:
        changes["symmetric"] = symmetric
    if bits is not None:
        changes["bits"] = bits
    if observer is not None:
        changes["observer"] = observer
    if not changes:
        return base
    weights = spec.replace(**changes)
    return base.replace(weights=weights, name=f"{base.name}({weights.describe()})")

