"""Round-to-nearest on the default model, every format: bench/results/rtn.json and rtn.md.

    python bench/rtn.py [--only W4A16,NF4] [--out bench/results]
"""

from _runner import main

SETTINGS: list[tuple[str, list[str]]] = [
    ("W8A16 int8 per-channel sym", ["--scheme", "W8A16"]),
    ("W8A16+lm_head-int8 int8 per-channel sym, lm_head too (untied)", ["--scheme", "W8A16", "--lm-head", "int8"]),
    ("W4A16 int4 g128 sym", ["--scheme", "W4A16"]),
    ("W4A16+lm_head-int8 int4 g128 sym, lm_head int8 per-channel (untied)", ["--scheme", "W4A16", "--lm-head", "int8"]),
    ("W4A16_ASYM int4 g128 asym", ["--scheme", "W4A16_ASYM"]),
    ("W4A16_ASYM+mse int4 g128 asym, MSE clipping", ["--scheme", "W4A16_ASYM", "--observer", "mse"]),
    ("W3A16 int3 g128 asym", ["--scheme", "W3A16"]),
    ("NF4 g64", ["--scheme", "NF4"]),
    ("FP8 e4m3 per-channel, dynamic per-token activations", ["--scheme", "FP8"]),
    ("W8A8 int8 per-channel, dynamic per-token activations", ["--scheme", "W8A8"]),
]

if __name__ == "__main__":
    main("rtn", "Round-to-nearest", SETTINGS, __doc__)
