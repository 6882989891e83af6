"""Reading and writing quantised checkpoints."""

from lowbit.io.native import is_native_checkpoint, load_native, read_manifest, save_native

__all__ = ["is_native_checkpoint", "load_native", "read_manifest", "save_native"]
