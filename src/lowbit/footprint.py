"""How many bytes a model's weights take, measured on a model or computed from its config.

Float tensors that a scheme leaves alone (embeddings, norms, ``lm_head``) are counted at
``float_bytes`` each (2: bf16/fp16, what checkpoints and serving engines hold); quantised
linear layers at exactly the bytes of their packed codes, scales and zero points
(`lowbit.tensor.storage_bytes`, the same function the checkpoint layout comes from).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.layers import name_filter
from lowbit.formats.e8p import DIM, SOURCE_SIZE
from lowbit.nn import QuantLinear, quantized_modules
from lowbit.nn.e8p_linear import E8PLinear, e8p_modules
from lowbit.nn.incoherent import incoherent_modules
from lowbit.scheme import Scheme
from lowbit.tensor import storage_bytes

GiB = 1024**3
USABLE_FRACTION = 0.9  # leave a tenth of the card for activations, KV cache and the runtime

# (name, memory in GB as sold); GB here is 10^9 bytes, as vendors count.
GPUS: tuple[tuple[str, float], ...] = (
    ("RTX 4060 Ti 16GB", 16),
    ("RTX 3090 / 4090 / L4 / A10 (24GB)", 24),
    ("RTX 5090 (32GB)", 32),
    ("A100 40GB", 40),
    ("L40S / RTX 6000 Ada (48GB)", 48),
    ("A100 / H100 80GB", 80),
    ("H200 (141GB)", 141),
    ("B200 / MI300X (192GB)", 192),
)


@dataclass
class Footprint:
    """Weight bytes of a model, split into quantised linears and everything else."""

    quantized_bytes: int
    quantized_params: int
    float_bytes: int
    float_params: int

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.float_bytes

    @property
    def total_params(self) -> int:
        return self.quantized_params + self.float_params

    @property
    def bits_per_weight(self) -> float | None:
        """Bits per weight of the quantised linear layers, metadata included."""
        return 8.0 * self.quantized_bytes / self.quantized_params if self.quantized_params else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "weight_bytes": self.total_bytes,
            "params": self.total_params,
            "quantized_bytes": self.quantized_bytes,
            "quantized_params": self.quantized_params,
            "bits_per_weight": self.bits_per_weight,
        }


def model_footprint(model: nn.Module, float_bytes: int = 2) -> Footprint:
    """Measure a (possibly quantised) model; tied tensors count once."""
    quant = {**quantized_modules(model), **e8p_modules(model)}
    q_bytes = sum(m.stored_nbytes if isinstance(m, QuantLinear) else m.weight.nbytes for m in quant.values())
    q_params = sum(m.in_features * m.out_features for m in quant.values())
    # incoherence processing stores one sign bit per input and output feature of each wrapped layer;
    # E8P decodes from a 256 × 8 table of small integers, counted once (a byte each) when used
    q_bytes += sum(m.signs_bytes for m in incoherent_modules(model).values())
    q_bytes += SOURCE_SIZE * DIM if any(isinstance(m, E8PLinear) for m in quant.values()) else 0
    seen: set[int] = set()
    f_params = 0
    for param in model.parameters():
        if param.data_ptr() in seen:
            continue
        seen.add(param.data_ptr())
        f_params += param.numel()
    return Footprint(q_bytes, q_params, f_params * float_bytes, f_params)


# -- from a config alone ------------------------------------------------------------------

def _get(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is not None:
        return default
    raise LowbitError(f"the model config has none of the fields {', '.join(keys)}.")


EMBEDDING = "model.embed_tokens.weight"  # the input embedding in `config_tensors`


def config_tensors(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every weight of a LLaMA-style decoder (dense or mixture of experts)."""
    if "text_config" in config:  # multimodal wrappers keep the language model here
        config = config["text_config"]
    h = int(_get(config, "hidden_size", "n_embd", "d_model"))
    layers = int(_get(config, "num_hidden_layers", "n_layer", "num_layers"))
    heads = int(_get(config, "num_attention_heads", "n_head"))
    kv_heads = int(_get(config, "num_key_value_heads", default=heads))
    head_dim = int(config.get("head_dim") or h // heads)
    inter = int(_get(config, "intermediate_size", "n_inner", default=4 * h))
    vocab = int(_get(config, "vocab_size"))
    experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
    moe_inter = int(config.get("moe_intermediate_size") or inter)

    out: list[tuple[str, tuple[int, ...]]] = [(EMBEDDING, (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.self_attn.q_proj", (heads * head_dim, h)),
            (f"{p}.self_attn.k_proj", (kv_heads * head_dim, h)),
            (f"{p}.self_attn.v_proj", (kv_heads * head_dim, h)),
            (f"{p}.self_attn.o_proj", (h, heads * head_dim)),
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
        ]
        if experts:
            out.append((f"{p}.mlp.gate.weight", (experts, h)))  # the router stays in float
            for e in range(experts):
                q = f"{p}.mlp.experts.{e}"
                out += [(f"{q}.gate_proj", (moe_inter, h)), (f"{q}.up_proj", (moe_inter, h)),
                        (f"{q}.down_proj", (h, moe_inter))]
        else:
            out += [(f"{p}.mlp.gate_proj", (inter, h)), (f"{p}.mlp.up_proj", (inter, h)),
                    (f"{p}.mlp.down_proj", (h, inter))]
    out.append(("model.norm.weight", (h,)))
    if not config.get("tie_word_embeddings", False):
        out.append(("lm_head", (vocab, h)))
    return out


def config_footprint(config: dict[str, Any], scheme: Scheme | None, float_bytes: int = 2) -> Footprint:
    """Weight bytes of the model a config describes, quantised with ``scheme`` (None: float). A scheme that
    quantises lm_head unties a tied one: its codes come on top of the float embedding."""
    chosen = name_filter(scheme.targets, scheme.ignore) if scheme else None
    head = scheme.lm_head if scheme is not None else None
    tensors = config_tensors(config)
    if head is not None and all(name != "lm_head" for name, _ in tensors):
        tensors.append(("lm_head", dict(tensors)[EMBEDDING]))  # tied: the embedding's shape
    q_bytes = q_params = f_params = 0
    for name, shape in tensors:
        linear = len(shape) == 2 and not name.endswith(".weight")
        if head is not None and name == "lm_head":
            q_bytes += storage_bytes(head, (shape[0], shape[1]))
            q_params += math.prod(shape)
        elif scheme is not None and chosen is not None and linear and chosen(name):
            q_bytes += storage_bytes(scheme.spec_for(name), (shape[0], shape[1]))  # per module in a mixed scheme
            q_params += math.prod(shape)
        else:
            f_params += math.prod(shape)
    return Footprint(q_bytes, q_params, f_params * float_bytes, f_params)


def read_config(path: str | Path) -> dict[str, Any]:
    """A model config from a config.json file, a model directory, a GGUF file or 'default'."""
    from lowbit.models.loading import cached_gguf_config, resolve_source

    candidate = Path(str(path))
    if candidate.is_file() and candidate.suffix.lower() == ".json":
        config_file = candidate
    else:
        source = resolve_source(None if str(path) == "default" else path)
        if source.gguf_file is None:
            config_file = source.directory / "config.json"
        elif (cached := cached_gguf_config(source)) is not None:
            config_file = cached
        else:
            from transformers import AutoConfig

            try:
                return AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file).to_dict()
            except Exception as err:  # transformers raises many types; give one sentence
                raise LowbitError(f"could not read the config of '{source.label}': {err}") from err
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LowbitError(f"config file '{config_file}' is not valid JSON ({err.msg}).") from err
    if not isinstance(data, dict):
        raise LowbitError(f"config file '{config_file}' does not hold a JSON object.")
    return data


def gpus_that_fit(total_bytes: int) -> list[tuple[str, float, int]]:
    """(card, memory GB, cards needed) for each common GPU, using 90% of each card."""
    rows = []
    for name, gb in GPUS:
        usable = gb * 1e9 * USABLE_FRACTION
        rows.append((name, gb, max(1, math.ceil(total_bytes / usable))))
    return rows
