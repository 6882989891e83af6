"""A checkpoint's tensors on disk: one ``model.safetensors``, or shards with an index, the layout
transformers writes (``save_pretrained(max_shard_size=...)``) and every HF-style loader reads.

When the tensors exceed ``max_shard_size`` (5 GB by default: huggingface_hub's ``split_*_state_dict_into_shards``
and transformers 4 use it; transformers 5 defaults to 50 GB) a directory holds::

    model-00001-of-0000N.safetensors …   at most max_shard_size bytes of tensor data each, except a
                                          unit larger than that, which gets a shard of its own
    model.safetensors.index.json          {"metadata": {"total_size": bytes of all tensors},
                                           "weight_map": {tensor name: shard file name}}

and otherwise one ``model.safetensors`` and no index. A *unit* is the tensors that stay in one file:
a quantised layer's codes, scales, zero points and g_idx (qdata/scale/zero_point/g_idx, or
qweight/qzeros/scales/g_idx, with its bias); every float tensor is a unit of its own. Units are packed
greedily in the order given, made only when the shard that takes them is being filled (a generator), and
a shard is written as soon as the next unit would overflow it: what the writer holds beyond the model is
the converted tensors of one shard at most. (safetensors writes a file from the tensors' own memory, so
the native format, whose tensors are the model's, holds nothing extra; measured on the default model at
W4A16 g64 with every allocation returned to the system on free: compressed-tensors 55 MB extra in one
file, 20 MB at max_shard_size="20MB"; GPTQ 88 MB and 47 MB, one layer's repacking included.)

Reading checks the index against the shards and ends every disagreement in one LowbitError naming the
file and tensor: an index that is not a JSON object with a ``weight_map`` of names to plain file names,
a shard it lists that is missing, a tensor it places in a shard that does not hold it, and a tensor a
shard holds that the index does not list. That last one is an error, not ignored (transformers reads
only what the index lists): the index and the shards then disagree — a shard left from another save,
a damaged index — and neither can be trusted over the other. ``metadata.total_size`` is informational
(tools count it differently) and is not checked. Tensors stay memory-mapped from their files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.io.skeleton import json_object

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "2GB", "500MB" or "1.5GiB" (decimal and binary units as
    transformers reads them, but in bytes whatever their case: transformers reads "5Gb" as gigabits), or a
    LowbitError."""
    if isinstance(size, int) and not isinstance(size, bool):
        count = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise LowbitError(f"max shard size {size!r} is not a size (bytes, or e.g. 500MB, 2GB, 1GiB).")
        count = int(float(match.group(1)) * _UNITS[unit])
    if count <= 0:
        raise LowbitError(f"max shard size must be positive, got {size!r}.")
    return count


def layer_units(tensors: dict[str, torch.Tensor], layers: Iterable[str]) -> list[dict[str, torch.Tensor]]:
    """``tensors`` cut into units: every ``L.<key>`` of a layer ``L`` in ``layers`` together, every
    other tensor alone; in the order of first appearance."""
    layers = set(layers)
    units: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        owner = key.rsplit(".", 1)[0]
        units.setdefault(owner if owner in layers else key, {})[key] = tensor
    return list(units.values())


def shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def save_tensors(directory: Path, units: Iterable[dict[str, torch.Tensor]],
                 max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[Path]:
    """Write ``units`` (dicts of tensors that stay in one file, produced one by one) into ``directory``
    as ``model.safetensors``, or as shards plus an index when they exceed ``max_shard_size``; returns
    the files written. Meant for the temporary directory of an atomic write: shards are written under
    provisional names and renamed once their number is known."""
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    parts: list[tuple[Path, list[str]]] = []  # provisional file, tensor names in it
    shard: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    shard_bytes = total = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        part = directory / f".shard-{len(parts) + 1:05d}.part"
        save_file(shard, str(part), metadata={"format": "pt"})
        parts.append((part, list(shard)))
        shard, shard_bytes = {}, 0

    for unit in units:
        size = sum(t.numel() * t.element_size() for t in unit.values())
        if shard and shard_bytes + size > limit:
            flush()
        for key, tensor in unit.items():
            if key in seen:
                raise LowbitError(f"tensor {key} would be written twice.")  # a writer's bug, said plainly
            seen.add(key)
            shard[key] = tensor.detach().contiguous().cpu()
        shard_bytes += size
        total += size
    if shard or not parts:
        flush()
    if len(parts) == 1:
        return [parts[0][0].rename(directory / WEIGHTS)]
    weight_map: dict[str, str] = {}
    files = []
    for i, (part, names) in enumerate(parts, start=1):
        files.append(part.rename(directory / shard_name(i, len(parts))))
        weight_map.update(dict.fromkeys(names, files[-1].name))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*files, directory / INDEX]


@dataclass(frozen=True)
class StoredTensors:
    """A checkpoint's tensors, memory-mapped, and where each one came from (for error messages)."""

    tensors: dict[str, torch.Tensor]  # name → tensor
    files: dict[str, Path]  # name → the file holding it
    where: Path  # the one weights file, the index of the shards, or the directory of several files

    def file(self, name: str) -> Path:
        """The file holding tensor ``name``, or `where` when no file does."""
        return self.files.get(name, self.where)


def _read_file(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (OSError, SafetensorError) as err:
        raise LowbitError(f"could not read '{file}': {err}") from err


def _read_index(index: Path) -> dict[str, str]:
    """The index's weight_map, checked: tensor names to plain file names beside the index."""
    try:
        text = index.read_text(encoding="utf-8")
    except (OSError, ValueError) as err:
        raise LowbitError(f"could not read '{index}' ({err}).") from err
    weight_map = json_object(text, index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise LowbitError(f"'{index}' has no weight_map object naming the shard of each tensor.")
    for name, file in weight_map.items():
        if (not isinstance(file, str) or file in ("", ".", "..")
                or any(c in file for c in "/\\\0") or not file.endswith(".safetensors")):
            raise LowbitError(f"'{index}' places tensor {name} in {file!r}, which is not a .safetensors file name "
                              "beside the index.")
    return weight_map


def load_tensors(directory: str | Path, files: list[Path] | None = None) -> StoredTensors:
    """The tensors of checkpoint ``directory``: from the shards its index lists when it has one, else
    from ``files`` (default: its ``model.safetensors``). A tensor in two files, a listed shard that is
    missing or unreadable, and any disagreement between the index and the shards is a LowbitError."""
    directory = Path(directory)
    index = directory / INDEX
    if not index.is_file():
        files = [directory / WEIGHTS] if files is None else files
        stored = StoredTensors({}, {}, files[0] if len(files) == 1 else directory)
        for file in files:
            for name, tensor in _read_file(file).items():
                if name in stored.files:
                    raise LowbitError(f"tensor {name} is in both '{stored.files[name]}' and '{file}'.")
                stored.tensors[name], stored.files[name] = tensor, file
        return stored
    weight_map = _read_index(index)
    by_shard: dict[str, set[str]] = {}
    for name, file in weight_map.items():
        by_shard.setdefault(file, set()).add(name)
    for file, names in by_shard.items():
        if not (directory / file).is_file():
            raise LowbitError(f"shard '{directory / file}' listed in '{index}' (for tensor {min(names)}) is missing.")
    stored = StoredTensors({}, {}, index)
    for file, names in by_shard.items():
        shard = directory / file
        tensors = _read_file(shard)
        unlisted = sorted(set(tensors) - names)
        if unlisted:
            other = weight_map.get(unlisted[0])
            raise LowbitError(f"'{shard}' holds tensor {unlisted[0]}, which '{index}' "
                              + (f"places in '{other}'." if other else "does not list."))
        absent = sorted(names - set(tensors))
        if absent:
            raise LowbitError(f"tensor {absent[0]}, which '{index}' places in '{shard}', is missing from it.")
        stored.tensors.update(tensors)
        stored.files.update(dict.fromkeys(tensors, shard))
    return stored
