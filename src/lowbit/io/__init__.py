"""Reading and writing quantised checkpoints: lowbit's native format, compressed-tensors, GPTQ v1; writing GGUF."""

from lowbit.io.compressed_tensors import (
    is_compressed_tensors_checkpoint,
    load_compressed_tensors,
    save_compressed_tensors,
)
from lowbit.io.gguf import atomic_file, check_file_target, gguf_target, save_gguf
from lowbit.io.gptq import is_gptq_checkpoint, load_gptq, save_gptq
from lowbit.io.native import atomic_directory, check_directory_target, is_native_checkpoint, load_native, read_manifest, save_native

__all__ = ["atomic_directory", "atomic_file", "check_directory_target", "check_file_target", "gguf_target", "is_compressed_tensors_checkpoint", "is_gptq_checkpoint",
           "is_native_checkpoint", "load_compressed_tensors", "load_gptq", "load_native", "read_manifest",
           "save_compressed_tensors", "save_gguf", "save_gptq", "save_native"]
