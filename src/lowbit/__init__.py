"""lowbit: quantise large language models to INT8/INT4/INT3/INT2, NF4 and FP8, measure the
damage, run the result, and write it where serving engines can read it."""

from lowbit.algorithms import AWQ, GPTQ, RTN, SmoothQuant
from lowbit.api import EvalReport, QuantInfo, evaluate, load, load_model, load_tokenizer, quantize, save
from lowbit.calibration import calibration_set, load_text
from lowbit.errors import LowbitError
from lowbit.eval import EvalConfig, reference_stats
from lowbit.eval.downstream import evaluate_tasks
from lowbit.scheme import (FP8, NF4, PRESETS, W2A16, W3A16, W4A16, W4A16_ASYM, W8A8, W8A8_STATIC, W8A16,
                           QuantSpec, Scheme)
from lowbit.tensor import QuantizedWeight
from lowbit.algorithms.qat import QAT
from lowbit.training import TrainReport, convert, prepare_qat, prepare_qlora, save_adapters, train_qat

__version__ = "0.1.0"

__all__ = [
    "AWQ", "FP8", "GPTQ", "NF4", "PRESETS", "RTN", "SmoothQuant", "W2A16", "W3A16", "W4A16", "W4A16_ASYM", "W8A16",
    "W8A8", "W8A8_STATIC",
    "EvalConfig", "EvalReport", "LowbitError", "QuantInfo", "QuantSpec", "QuantizedWeight", "Scheme",
    "calibration_set", "evaluate", "evaluate_tasks", "load", "load_model", "load_text", "load_tokenizer", "quantize",
    "reference_stats", "save",
    "QAT", "TrainReport", "convert", "prepare_qat", "prepare_qlora", "save_adapters", "train_qat",
]
