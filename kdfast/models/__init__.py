"""Model builders for distillation: MobileBERT blocks, DistilBERT/TinyBERT students, layer maps, counting."""

from kdfast.losses.layer_map import uniform_layer_map

from .counting import count
from .fused import disable_fused_kernels, enable_fused_kernels
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
from .students import distilbert_from_teacher, tinybert, tinybert_config, tinybert_student, trim_vocabulary

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
    "tinybert_student",
    "trim_vocabulary",
    "uniform_layer_map",
]
