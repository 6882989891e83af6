"""Loading models and finding their decoder layers and linear modules."""

from lowbit.models.layers import decoder_layers, output_embedding_name, select_linears, set_submodule
from lowbit.models.loading import (
    ModelSource,
    default_model_path,
    load_pretrained,
    load_pretrained_tokenizer,
    resolve_source,
)

__all__ = [
    "ModelSource",
    "decoder_layers",
    "default_model_path",
    "load_pretrained",
    "load_pretrained_tokenizer",
    "output_embedding_name",
    "resolve_source",
    "select_linears",
    "set_submodule",
]
