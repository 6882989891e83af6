"""Round-to-nearest (RTN): every weight to its nearest code, with the spec's observer.

The baseline every other method must beat. No calibration data; the range of each
group comes from min-max, a percentile, or an MSE-optimal clipping search.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from torch import Tensor

from lowbit.scheme import QuantSpec
from lowbit.tensor import QuantizedWeight, quantize_weight


def rtn_quantize(W: Tensor, spec: QuantSpec, name: str = "weight") -> QuantizedWeight:
    """W (R, C) → its round-to-nearest `QuantizedWeight`."""
    return quantize_weight(W, spec, name=name)


@dataclass(frozen=True)
class RTN:
    """Round-to-nearest; needs no calibration data."""

    name: str = "rtn"
    needs_calibration: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
