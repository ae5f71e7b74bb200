r"""Kernel family ``mobilebert_blocks``: MobileBERT's memory-bound block steps.

Users call :func:`kdfast.models.fused.fused_bias_residual_nonorm`, :func:`~kdfast.models.fused.fused_stacked_ffn`
and :func:`~kdfast.models.fused.fused_attention_inputs` (or route a :class:`kdfast.models.KDMobileBert` to them
with :func:`kdfast.models.enable_fused_kernels`); those run the ops below through :mod:`kdfast.ops.registry`.
On rows of width D (``x``, ``residual``, ``dy``, ``h``, ``dh``: [N, D] with unit column stride; ``bias``,
``gamma``, ``beta``: [D]; sums over the N rows):

``nonorm_fwd(x, bias, residual, gamma, beta) -> y``: bias + residual + NoNorm in one pass,

    y = (x + bias + residual) * gamma + beta          (``bias`` / ``residual`` may be None: left out)

``nonorm_bwd(dy, x, bias, residual, gamma) -> (dx, dbias, dgamma, dbeta)``: its backward in one pass over
``dy``, ``x`` and ``residual`` (the sum is recomputed, never stored),

    dx = dresidual = dy * gamma,  dbias = gamma * sum dy,  dgamma = sum dy * (x + bias + residual),  dbeta = sum dy

``relu_bwd_colsum(dh, h) -> db``: ReLU backward in place fused with the preceding bias's gradient,

    dh <- dh * [h > 0],  db = sum dh

Backends: ``torch`` (:mod:`.eager`, any dtype), ``triton`` (:mod:`.triton` with ``AOT_CONFIGS``; fp32 / fp16 /
bf16, column sums accumulated in fp32), ``cpu`` (``torch.ops.kdfast.nonorm_fwd`` / ``nonorm_bwd`` /
``relu_bwd_colsum``, ``csrc/ops/mobilebert_blocks/cpu.cpp``, which registers their schemas itself; float32 /
float64).
Tests: ``tests/models/test_fused.py`` (every registered backend against the eager functions and
transformers), ``tests/test_gpu.py`` (the compiled Triton kernels).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast.backend import _extension
from kdfast.ops.mobilebert_blocks import eager as _eager
from kdfast.ops.registry import register

# the C++ kernels are written for these (the others run torch under "auto")
CPU_DTYPES = (torch.float32, torch.float64)
_TRITON_AOT = "kdfast.ops.mobilebert_blocks.triton:AOT_CONFIGS"


def nonorm_fwd_triton(x: Tensor, bias: Tensor | None, residual: Tensor | None, gamma: Tensor,
                      beta: Tensor) -> Tensor:
    """``nonorm_fwd`` on the Triton kernel (imported on first use)."""
    from kdfast.ops.mobilebert_blocks import triton as kernels

    return kernels.nonorm_fwd_triton(x, bias, residual, gamma, beta)


def nonorm_bwd_triton(dy: Tensor, x: Tensor, bias: Tensor | None, residual: Tensor | None,
                      gamma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``nonorm_bwd`` on the Triton kernel."""
    from kdfast.ops.mobilebert_blocks import triton as kernels

    return kernels.nonorm_bwd_triton(dy, x, bias, residual, gamma)


def relu_bwd_colsum_triton(dh: Tensor, h: Tensor) -> Tensor:
    """``relu_bwd_colsum`` on the Triton kernel."""
    from kdfast.ops.mobilebert_blocks import triton as kernels

    return kernels.relu_bwd_colsum_triton(dh, h)


def nonorm_fwd_cpu(x: Tensor, bias: Tensor | None, residual: Tensor | None, gamma: Tensor,
                   beta: Tensor) -> Tensor:
    """``nonorm_fwd`` on the compiled C++ kernel."""
    return torch.ops.kdfast.nonorm_fwd(x, bias, residual, gamma, beta)


def nonorm_bwd_cpu(dy: Tensor, x: Tensor, bias: Tensor | None, residual: Tensor | None,
                   gamma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``nonorm_bwd`` on the compiled C++ kernel."""
    return torch.ops.kdfast.nonorm_bwd(dy, x, bias, residual, gamma)


def relu_bwd_colsum_cpu(dh: Tensor, h: Tensor) -> Tensor:
    """``relu_bwd_colsum`` on the compiled C++ kernel."""
    return torch.ops.kdfast.relu_bwd_colsum(dh, h)


if _extension()[0] is not None:
    # shapes of the C++ ops for torch.compile / meta tensors

    @torch.library.register_fake("kdfast::nonorm_fwd")
    def _nonorm_fwd_fake(x, bias, residual, gamma, beta):
        return x.new_empty(x.shape)

    @torch.library.register_fake("kdfast::nonorm_bwd")
    def _nonorm_bwd_fake(dy, x, bias, residual, gamma):
        d = x.shape[1]
        return x.new_empty(x.shape), x.new_empty(d), x.new_empty(d), x.new_empty(d)

    @torch.library.register_fake("kdfast::relu_bwd_colsum")
    def _relu_bwd_colsum_fake(dh, h):
        return dh.new_empty(dh.shape[1])


for _op, _torch_fn, _triton_fn, _cpu_fn in (
        ("nonorm_fwd", _eager.nonorm_fwd_torch, nonorm_fwd_triton, nonorm_fwd_cpu),
        ("nonorm_bwd", _eager.nonorm_bwd_torch, nonorm_bwd_triton, nonorm_bwd_cpu),
        ("relu_bwd_colsum", _eager.relu_bwd_colsum_torch, relu_bwd_colsum_triton, relu_bwd_colsum_cpu)):
    register(_op, "torch", _torch_fn)
    register(_op, "triton", _triton_fn, aot_configs=_TRITON_AOT)
    register(_op, "cpu", _cpu_fn, dtypes=CPU_DTYPES)
