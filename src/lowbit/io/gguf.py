"""GGUF export: one ``.gguf`` file that llama.cpp, Ollama and LM Studio load (LLaMA architecture).

The file is written with the ``gguf`` package's `GGUFWriter`; the block codecs are ours
(`lowbit.formats.ggml`, which cites the layouts). What goes in:

- ``general.*`` (architecture ``llama``, name, file_type, quantization_version 2,
  quantized_by), the ``llama.*`` hyper-parameters llama.cpp reads, and the tokenizer
  (``tokenizer.ggml.model = gpt2``: tokens, token types, merges, special ids, add_bos,
  chat template) built from the HF tokenizer's ``tokenizer.json``. The pre-tokenizer
  name (``tokenizer.ggml.pre``) is what llama.cpp keys its split regex on; it is copied
  from the source GGUF when the model came from one (the default model: ``smollm``),
  else ``default`` unless given.
- Tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q``, …, ``output_norm``;
  ``output`` only when not tied). q and k rows are permuted as llama.cpp's HF converter
  does: HF's rotary embedding pairs dimension i of a head with i + d/2, llama.cpp's
  (GGML_ROPE normal mode) pairs 2i with 2i + 1, so GGUF row 2i is HF row i and row 2i + 1
  is HF row i + d/2. transformers' GGUF loader undoes it.

Which GGML type each tensor gets:

- A quantised layer whose lowbit weight lies on a GGUF grid is written losslessly:
  int8 symmetric, group 32, float16 scales → Q8_0; int4 symmetric, group 32, float16
  scales → Q4_0 (lowbit's offset-8 codes are Q4_0's codes, its scale Q4_0's d); int4
  asymmetric, group 32, float16 scales → Q4_1 with d = scale and m = −zero·scale rounded
  to float16. That last rounding is the only loss: |Δm| ≤ 2⁻¹¹·zero·scale (plus 2⁻²⁵ where
  m is subnormal), under 0.74 % of one quantisation step since zero ≤ 15. The presets
  `Q8_0`, `Q4_0`, `Q4_1` in `lowbit.scheme` quantise exactly onto these grids, so
  ``lowbit quantize default --scheme Q4_0 --method gptq --format gguf --out m.gguf`` gives
  GPTQ's quality in a file llama.cpp runs (llama.cpp cannot read GPTQ checkpoints).
  Any other quantised layer (group 128, act-order's g_idx, bfloat16 scales, …) is refused
  with the layer and the scheme that would fit named.
- Float linear weights (all of them in a float model, and any a scheme left alone) get
  ``gguf_type``: F32, F16 (the default), or our own Q8_0 / Q4_0 / Q4_1 / Q6_K / Q4_K
  encoders, as llama.cpp's ``llama-quantize`` would. k-quants need rows of a multiple of
  256; other rows fall back to Q8_0 (for Q6_K, as llama.cpp does) or Q4_1 (for Q4_K;
  llama.cpp uses Q5_0, which is not written here).
- The token embedding (and an untied output) gets ``embedding_type``, Q8_0 by default: with
  tied embeddings it is also the output projection, the most sensitive matrix, and Q8_0
  keeps it within 0.4 % of each block's largest value at 8.5 bits (F16 would be 16 bits
  for ~a fifth of a small model's parameters); the default model's own file does the same.
- Norms and other 1-D tensors: F32.

Writes are atomic: a temporary file beside the target, renamed over it at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.ggml import GGML_BLOCKS, ggml_encode, q4_0_from_codes, q4_1_from_codes, q8_0_from_codes
from lowbit.io.skeleton import check_exportable, tied_output_key
from lowbit.nn import QuantLinear, checkpoint_layout, quantized_modules

log = logging.getLogger(__name__)

DEFAULT_FILE = "model.gguf"
FLOAT_TYPES = ("F32", "F16")
GGUF_TYPES = FLOAT_TYPES + tuple(GGML_BLOCKS)
_K_FALLBACK = {"Q6_K": "Q8_0", "Q4_K": "Q4_1"}
_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0",
               "Q4_1": "MOSTLY_Q4_1", "Q6_K": "MOSTLY_Q6_K", "Q4_K": "MOSTLY_Q4_K_S"}
_LOSSLESS = {(8, True): "Q8_0", (4, True): "Q4_0", (4, False): "Q4_1"}


def gguf_target(out: str | os.PathLike[str]) -> Path:
    """The file a GGUF save writes: ``out`` itself when it ends in ``.gguf``, else ``out/model.gguf``."""
    out = Path(out)
    return out if out.suffix.lower() == ".gguf" and not out.is_dir() else out / DEFAULT_FILE


def check_file_target(target: Path, overwrite: bool) -> None:
    """Refuse an existing ``target`` unless ``overwrite``."""
    if target.exists() and not overwrite:
        raise LowbitError(f"'{target}' already exists; choose another path or overwrite it.")


@contextlib.contextmanager
def atomic_file(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary file beside ``target`` to write; renamed over it when the block succeeds and removed when
    it fails, so an interrupted write leaves any previous file as it was."""
    check_file_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# -- what the model is --------------------------------------------------------------------------

def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise LowbitError(f"rope scaling {kind!r} is not written to GGUF here (only plain RoPE).")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise LowbitError("the model's config has no rope_theta.")
    return float(theta)


def _check_llama(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise LowbitError("only Hugging Face models (with a .config) can be written as GGUF.")
    if getattr(config, "model_type", None) != "llama":
        raise LowbitError(f"GGUF export writes the LLaMA architecture; this model is "
                          f"{getattr(config, 'model_type', type(model).__name__)!r}.")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise LowbitError(f"the model has {flag}, which the GGUF llama writer here does not handle.")
    return config


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _rope_rows(rows: int, heads: int) -> torch.Tensor:
    """Index of the HF row that goes to each GGUF row of a q or k projection (see the module docstring)."""
    d = rows // heads
    j = torch.arange(rows)
    head, within = j // d, j % d
    return head * d + (within % 2) * (d // 2) + within // 2


# -- tensors ------------------------------------------------------------------------------------

def implied_type(name: str, layer: QuantLinear) -> str:
    """The GGUF type that holds ``layer``'s quantised weight exactly, or a LowbitError naming what would."""
    spec, w = layer.spec, layer.weight
    fit = "quantise with the Q4_0, Q4_1 or Q8_0 scheme (int4/int8, group 32, float16 scales)"
    if layer.activations is not None:
        raise LowbitError(f"layer {name} quantises activations ({layer.activations.describe()}), which GGUF files "
                          f"do not hold; {fit}.")
    if w.g_idx is not None:
        raise LowbitError(f"layer {name} has act-order's column order (g_idx), which GGUF cannot hold; {fit} and "
                          "--static-groups or without act-order.")
    kind = _LOSSLESS.get((spec.bits, spec.symmetric)) if spec.format == "int" else None
    if (kind is None or spec.granularity != "group" or spec.group_size != 32 or spec.double_quant
            or w.scale.dtype != torch.float16):
        raise LowbitError(f"layer {name} is quantised as {spec.describe()} with {w.scale.dtype} scales, which no "
                          f"GGUF type holds exactly; {fit}, or export the float model with a gguf_type.")
    return kind


def _lossless_blocks(layer: QuantLinear, kind: str) -> torch.Tensor:
    """The GGUF blocks (R, bytes) of a quantised weight, from its codes and scales, no re-quantisation."""
    w = layer.weight
    stored = w.codes() + (8 if kind == "Q4_0" else 0)  # Q4_0 keeps the offset-8 codes lowbit stores
    d = w.scale.reshape(w.scale_shape)
    if kind == "Q8_0":
        return q8_0_from_codes(stored, d)
    if kind == "Q4_0":
        return q4_0_from_codes(stored, d)
    m = -(w.zero_points().float() * d.float())  # w = d·q − d·z
    return q4_1_from_codes(stored, d, m.to(torch.float16))


def _float_weight(w: torch.Tensor, kind: str, what: str) -> tuple[str, np.ndarray]:
    if kind == "F32":
        return kind, w.detach().float().numpy()
    if kind == "F16":
        return kind, w.detach().to(torch.float16).numpy()
    if kind in _K_FALLBACK and w.shape[-1] % GGML_BLOCKS[kind][0]:
        log.info("%s: %d columns are not a multiple of 256; written as %s", what, w.shape[-1], _K_FALLBACK[kind])
        kind = _K_FALLBACK[kind]
    return kind, ggml_encode(w, kind, what).numpy()


def _check_type(kind: str, what: str) -> str:
    if kind not in GGUF_TYPES:
        raise LowbitError(f"{what} {kind!r} is not one of {', '.join(GGUF_TYPES)}.")
    return kind


def gguf_tensors(model: nn.Module, gguf_type: str | None = None, embedding_type: str = "Q8_0"
                 ) -> dict[str, tuple[str, np.ndarray]]:
    """GGUF name → (GGML type, data) of every tensor to write: float arrays (R, C) or (C,), or uint8
    blocks (R, bytes) for the block types; q/k rows in llama.cpp's order."""
    import gguf

    config = _check_llama(model)
    check_exportable(model, "GGUF")
    linear_type = _check_type(gguf_type or "F16", "gguf_type")
    _check_type(embedding_type, "embedding_type")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    quantized = quantized_modules(model)
    linears = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}
    embeddings = {n for n, m in model.named_modules()
                  if m is model.get_input_embeddings() or m is model.get_output_embeddings()}
    tied = tied_output_key(model)
    heads = {"attn_q": config.num_attention_heads,
             "attn_k": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    out: dict[str, tuple[str, np.ndarray]] = {}

    def put(hf: str, kind: str, data: np.ndarray | torch.Tensor) -> None:
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LowbitError(f"tensor {hf} has no llama.cpp name; this LLaMA variant is not written as GGUF.")
        role = name.split(".")[-2]
        if role in heads and data.ndim == 2:
            data = np.ascontiguousarray(np.asarray(data)[_rope_rows(data.shape[0], heads[role]).numpy()])
        out[name] = (kind, np.asarray(data))

    for name, layer in quantized.items():
        if layer.bias is not None:
            raise LowbitError(f"layer {name} has a bias, which the GGUF llama writer here does not handle.")
        kind = implied_type(name, layer)
        put(f"{name}.weight", kind, _lossless_blocks(layer, kind).numpy())
    skip = {f"{n}.{b}" for n, m in quantized.items() for b in m.buffer_keys()}
    with checkpoint_layout():
        state = model.state_dict()
    for key, tensor in state.items():
        if key in skip or key == tied:
            continue
        module = key.rsplit(".", 1)[0]
        if module in embeddings and tensor.dim() == 2:
            put(key, *_float_weight(tensor, embedding_type, key))
        elif module in linears and tensor.dim() == 2:
            put(key, *_float_weight(tensor, linear_type, key))
        elif tensor.dim() == 1:
            put(key, "F32", tensor.detach().float().numpy())
        else:
            raise LowbitError(f"tensor {key} of shape {tuple(tensor.shape)} is not a layer the GGUF llama writer "
                              "handles.")
    return out


# -- metadata -----------------------------------------------------------------------------------

def _source_pre(model: nn.Module) -> str | None:
    """``tokenizer.ggml.pre`` of the GGUF file the model was loaded from, if it was."""
    from lowbit.models.loading import resolve_source

    info = getattr(model, "lowbit_info", None)
    source = getattr(model, "lowbit_source", None) or getattr(info, "source", None)
    if source is None or source == "unknown":
        return None
    try:
        where = resolve_source(source)
    except LowbitError:
        return None
    if where.gguf_file is None:
        return None
    return metadata_string(where.directory / where.gguf_file, "tokenizer.ggml.pre")


def metadata_string(path: Path, key: str) -> str | None:
    """The string value of one metadata ``key`` of a GGUF file, or None without it: `header_string`'s walk of the
    header where it can follow it, gguf's reader otherwise (a big-endian file, a value type it does not know)."""
    import gguf

    try:
        return header_string(path, key)
    except (OSError, ValueError):  # not a header this reader follows (UnicodeDecodeError is one): gguf's reads it
        field = gguf.GGUFReader(path).get_field(key)
        return None if field is None else str(field.contents())


def header_string(path: Path, key: str) -> str | None:
    """The string value of one metadata ``key`` of a GGUF file (v2 or v3, little-endian), or None without it.

    Reads the key/value header up to that key and no further, skipping the values before it by their sizes:
    gguf's own reader builds every field, the tokenizer's 100 000 strings included, which took 4 s of an 8 s
    export of the default model on this project's machine. Raises ValueError where the header is not one it
    can follow (the caller then asks gguf's reader)."""
    import mmap
    import struct

    import gguf

    kinds = gguf.GGUFValueType
    scalar_bytes = {int(kind): np.dtype(dtype).itemsize for kind, dtype in gguf.GGUFReader.gguf_scalar_to_np.items()}
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF" or struct.unpack_from("<I", data, 4)[0] not in (2, 3):
            raise ValueError(f"{path} is not a little-endian GGUF v2/v3 file")
        count = struct.unpack_from("<Q", data, 16)[0]
        at = 24

        def string() -> bytes:
            nonlocal at
            size = struct.unpack_from("<Q", data, at)[0]
            at += 8 + size
            if at > len(data):
                raise ValueError(f"{path}: a metadata string runs past the end of the file")
            return data[at - size:at]

        def skip(kind: int) -> None:
            nonlocal at
            if kind in scalar_bytes:
                at += scalar_bytes[kind]
            elif kind == kinds.STRING:
                string()
            elif kind == kinds.ARRAY:
                inner, n = struct.unpack_from("<IQ", data, at)
                at += 12
                if inner in scalar_bytes:
                    at += n * scalar_bytes[inner]
                else:
                    for _ in range(n):
                        skip(inner)
            else:
                raise ValueError(f"{path}: unknown metadata type {kind}")

        try:
            for _ in range(count):
                name = string()
                kind = struct.unpack_from("<I", data, at)[0]
                at += 4
                if name == key.encode():
                    if kind != kinds.STRING:
                        raise ValueError(f"{path}: {key} is not a string")
                    return string().decode("utf-8")
                skip(kind)
        except struct.error as err:  # a size read past the end
            raise ValueError(f"{path}: the metadata header ends early ({err})") from None
    return None


def _write_tokenizer(writer: Any, tokenizer: Any, n_vocab: int, pre: str) -> None:
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LowbitError("GGUF export needs a fast (tokenizer.json) tokenizer.")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise LowbitError(f"tokenizer model {model.get('type')!r} is not written to GGUF here (byte-level BPE only).")
    vocab: dict[int, str] = {int(i): tok for tok, i in model["vocab"].items()}
    kinds = {i: gguf.TokenType.NORMAL for i in vocab}
    for added in spec.get("added_tokens", []):
        vocab[int(added["id"])] = added["content"]
        kinds[int(added["id"])] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(vocab) >= n_vocab:
        raise LowbitError(f"the tokenizer has token id {max(vocab)}, beyond the model's {n_vocab} embeddings.")
    tokens = [vocab.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    types = [int(kinds.get(i, gguf.TokenType.UNUSED)) for i in range(n_vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id}
    for key, value in ids.items():
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(int(value))
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(ids["bos"] is not None and probe[:1] == [ids["bos"]])
    writer.add_add_eos_token(ids["eos"] is not None and probe[-1:] == [ids["eos"]])
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)


def _write_hparams(writer: Any, config: Any, file_type: str, name: str) -> None:
    import gguf

    writer.add_type("model")
    writer.add_name(name)
    writer.add_quantized_by("lowbit")
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(_rope_theta(config))
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(int(gguf.LlamaFileType[_FILE_TYPES[file_type]]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def save_gguf(model: nn.Module, out: str | os.PathLike[str], tokenizer: Any = None, gguf_type: str | None = None,
              embedding_type: str = "Q8_0", pre_tokenizer: str | None = None, overwrite: bool = False) -> Path:
    """Write a LLaMA-architecture model (quantised or float) as one GGUF file; returns its path.

    ``out`` is the file when it ends in ``.gguf``, else a directory that gets ``model.gguf``.
    ``gguf_type`` is the type of float linear weights (F16 unless given), ``embedding_type`` that of
    the token embedding; quantised layers keep their own grid (see the module docstring).
    """
    import gguf

    if tokenizer is None:
        raise LowbitError("a GGUF file carries its tokenizer: pass tokenizer= (lowbit.load_tokenizer(...)).")
    target = gguf_target(out)
    check_file_target(target, overwrite)  # before the tensors are encoded
    config = _check_llama(model)
    tensors = gguf_tensors(model, gguf_type, embedding_type)
    linear_kinds = Counter(kind for name, (kind, data) in tensors.items() if name.startswith("blk.") and data.ndim == 2)
    file_type = linear_kinds.most_common(1)[0][0] if linear_kinds else "F32"
    pre = pre_tokenizer or _source_pre(model)
    if pre is None:
        log.warning("no tokenizer.ggml.pre known for this tokenizer; writing 'default' (llama.cpp's GPT-2 split)")
        pre = "default"
    # A GGUF-born config keeps the original model name; otherwise the HF path's last part.
    name = str(getattr(config, "_model_name_or_path", "") or Path(str(config.name_or_path or "model")).name)
    with atomic_file(target, overwrite) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        try:
            _write_hparams(writer, config, file_type, name or "model")
            _write_tokenizer(writer, tokenizer, int(config.vocab_size), pre)
            for tensor_name, (kind, data) in tensors.items():
                raw = None if kind in FLOAT_TYPES else gguf.GGMLQuantizationType[kind]
                writer.add_tensor(tensor_name, data, raw_dtype=raw)
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return target
