"""Modules that run quantised weights, and the ones that train them (QAT, QLoRA)."""

from lowbit.nn.fake_quant import ActivationFakeQuant, FakeQuantLinear, fake_quant_modules
from lowbit.nn.float_linear import FloatLinear, use_float_gemv
from lowbit.nn.lora import LoRALinear, lora_modules
from lowbit.nn.quant_linear import QuantLinear, checkpoint_layout, quantized_modules

__all__ = ["ActivationFakeQuant", "FakeQuantLinear", "FloatLinear", "LoRALinear", "QuantLinear", "checkpoint_layout",
           "fake_quant_modules", "lora_modules", "quantized_modules", "use_float_gemv"]
