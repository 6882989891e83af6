"""RTN against GPTQ (plain and act-order) at 4, 3 and 2 bits: bench/results/gptq.json and gptq.md.

Calibration is PROTOCOL.md's: 128 sequences of 512 tokens of pydoc-calib at offsets from
random.Random(0). Each GPTQ run is the command a user would type. Evaluated on pydoc-eval
(the calibration domain) and python-license (CPython's LICENSE.txt, legal prose: a check
that GPTQ has not overfitted its calibration text).

    python bench/gptq.py [--only W4A16,W3A16] [--note "..."]
"""

from _runner import main

TEXTS = ["--eval-text", "pydoc-eval", "--eval-text", "python-license"]  # calibration domain, and another
SETTINGS: list[tuple[str, list[str]]] = []
for scheme, what in (("W4A16", "int4 g128 sym"), ("W3A16", "int3 g128 asym"), ("W2A16", "int2 g64 asym")):
    SETTINGS += [
        (f"{scheme} {what}, RTN", ["--scheme", scheme, *TEXTS]),
        (f"{scheme} {what}, GPTQ", ["--scheme", scheme, "--method", "gptq", *TEXTS]),
        (f"{scheme} {what}, GPTQ act-order", ["--scheme", scheme, "--method", "gptq", "--act-order", *TEXTS]),
    ]

if __name__ == "__main__":
    main("gptq", "RTN vs GPTQ", SETTINGS, __doc__)
