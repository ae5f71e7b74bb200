"""Model builders for distillation: MobileBERT blocks, DistilBERT/TinyBERT students, layer maps, counting."""

from .counting import count
from kdfast.losses.layer_map import uniform_layer_map
from .mobilebert import (
    KDMobileBert,
    KDMobileBertForMaskedLM,
    KDMobileBertOutput,
    bias_residual_layernorm,
    bias_residual_nonorm,
    mobilebert_config,
    set_kernel_backend,
    stacked_ffn,
)
from .fused import disable_fused_kernels, enable_fused_kernels
from .students import distilbert_from_teacher, tinybert, tinybert_config

__all__ = [
    "KDMobileBert",
    "KDMobileBertForMaskedLM",
    "KDMobileBertOutput",
    "bias_residual_layernorm",
    "bias_residual_nonorm",
    "count",
    "disable_fused_kernels",
    "distilbert_from_teacher",
    "enable_fused_kernels",
    "mobilebert_config",
    "set_kernel_backend",
    "stacked_ffn",
    "tinybert",
    "tinybert_config",
    "uniform_layer_map",
]
