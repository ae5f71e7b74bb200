r"""Kernel family ``hidden_rows``: row kernels of the hidden-state transfer losses.

Users call :func:`kdfast.hidden_mse_loss`, :func:`kdfast.cosine_loss` and :func:`kdfast.feature_map_loss`
(:mod:`kdfast.losses.hidden`: validation, the row weights, the autograd Functions); they run these ops
through :mod:`kdfast.ops.registry`. Rows are tokens, ``w`` [N] the row weights in the accumulation dtype
(float32, float64 for float64 input): 1 / (counted tokens x per-row normaliser) on counted rows, 0 on
padded ones, which may hold anything (NaN included) and give loss 0 and gradient 0.

Ops (the contract every backend implements):

``hidden_mse_epilogue(y, t, w) -> rows`` (TinyBERT hidden MSE through a projection). The loss computes a
chunk of Y = h_s W_p^T + b_p with the library GEMM into a contiguous buffer ``y`` [C, D] (accumulation
dtype); the op reads each row of Y once with the teacher row h_t (``t`` [C, D], any float dtype) and

    rows_r = w_r sum_j (Y_rj - h_t,rj)^2           (returned, [C])
    y_rj  <- dY_rj = 2 w_r (Y_rj - h_t,rj)        (in place: Y turns into dY, never kept for backward)

Backends: ``torch`` (:mod:`.eager`), ``triton`` (:mod:`.triton`, custom op
``kdfast::hidden_mse_epilogue_triton``; float32 ``y``), ``cpu`` (``torch.ops.kdfast.hidden_mse_epilogue``,
``csrc/ops/hidden_rows/cpu.cpp``; float32 / float64 ``y``).

``cosine_rows(s, t, w, eps, need_grad) -> (rows, grad)`` (DistilBERT cosine loss). With
ns = max(|s_r|, eps), nt = max(|t_r|, eps), cos_r = s_r . t_r / (ns nt):

    rows_r = w_r (1 - cos_r)
    grad_r = d rows_r / d s_r = -w_r (t_r / (ns nt) - [|s_r| > eps] cos_r s_r / ns^2)   (s's dtype)

``grad`` is an empty tensor unless ``need_grad``. Backends: ``torch``, ``triton`` (custom op
``kdfast::cosine_loss_triton``, one row per program in registers: rows wider than ``MAX_COSINE_WIDTH``
run the torch implementation), ``cpu`` (``torch.ops.kdfast.cosine_fwd_bwd``).

``feature_map(s, t, w, eps, beta_mean, beta_var) -> loss`` (MobileBERT feature-map transfer), with w = 1/|C|
on counted rows, per row mu_r, var_r (biased) over the d units and n_r = (h_r - mu_r) / sqrt(var_r + eps):

    loss = 1/d sum_r w_r |n^s_r - n^t_r|^2 + beta_mean sum_r w_r (mu^s_r - mu^t_r)^2
           + beta_var sum_r w_r |var^s_r - var^t_r|

Backend: ``torch`` only, differentiated by autograd.

Where the pieces live: this file (the contract, the Triton custom ops and their fakes, the fakes of the
compiled ops, the registrations), :mod:`.eager`, :mod:`.triton` (with ``AOT_CONFIGS``), the C++ kernels
in ``csrc/ops/hidden_rows/cpu.cpp`` (which registers their schemas itself), the float64 oracles in
``tests/reference.py``, the tests in ``tests/test_hidden_losses.py`` (run over every registered backend).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast.backend import _extension
from kdfast.ops.hidden_rows import eager as _eager
from kdfast.ops.registry import register

# The Triton cosine kernel keeps a whole row in registers: the registry runs wider rows on torch.
MAX_COSINE_WIDTH = 8192
_TRITON_AOT = "kdfast.ops.hidden_rows.triton:AOT_CONFIGS"


@torch.library.custom_op("kdfast::hidden_mse_epilogue_triton", mutates_args=("y",))
def mse_epilogue_triton_op(y: Tensor, t: Tensor, w: Tensor) -> Tensor:
    """The ``hidden_mse_epilogue`` contract on the Triton kernel (imported here, on first use)."""
    from kdfast.ops.hidden_rows.triton import mse_epilogue_triton

    return mse_epilogue_triton(y, t, w)


@mse_epilogue_triton_op.register_fake
def _(y, t, w):
    return y.new_empty(y.shape[0], dtype=torch.float32)


@torch.library.custom_op("kdfast::cosine_loss_triton", mutates_args=())
def cosine_triton_op(s: Tensor, t: Tensor, w: Tensor, eps: float, need_grad: bool) -> tuple[Tensor, Tensor]:
    """The ``cosine_rows`` contract on the Triton kernel (imported here, on first use)."""
    from kdfast.ops.hidden_rows.triton import cosine_triton

    return cosine_triton(s, t, w, eps, need_grad)


@cosine_triton_op.register_fake
def _(s, t, w, eps, need_grad):
    rows = s.new_empty(s.shape[0], dtype=torch.float32)
    return rows, (torch.empty_like(s) if need_grad else s.new_empty(0))


if _extension()[0] is not None:
    # shapes of the C++ ops (torch.ops.kdfast.*) for torch.compile / meta tensors

    @torch.library.register_fake("kdfast::hidden_mse_epilogue")
    def _hidden_mse_epilogue_fake(y, t, w):
        return y.new_empty(y.shape[0], dtype=w.dtype)

    @torch.library.register_fake("kdfast::cosine_fwd_bwd")
    def _cosine_fwd_bwd_fake(s, t, w, eps, need_grad):
        return s.new_empty(s.shape[0], dtype=w.dtype), (s.new_empty(s.shape) if need_grad else s.new_empty(0))


def mse_epilogue_cpu(y: Tensor, t: Tensor, w: Tensor) -> Tensor:
    """``hidden_mse_epilogue`` on the compiled C++ kernel (float32 / float64 ``y``)."""
    return torch.ops.kdfast.hidden_mse_epilogue(y, t, w)


def cosine_rows_cpu(s: Tensor, t: Tensor, w: Tensor, eps: float, need_grad: bool) -> tuple[Tensor, Tensor]:
    """``cosine_rows`` on the compiled C++ kernel."""
    return torch.ops.kdfast.cosine_fwd_bwd(s, t, w, eps, need_grad)


register("hidden_mse_epilogue", "torch", _eager.mse_epilogue_torch)
# float64 asked of the Triton kernels (which compute in float32) runs torch, as documented by the losses
register("hidden_mse_epilogue", "triton", mse_epilogue_triton_op, aot_configs=_TRITON_AOT, fallback="torch")
register("hidden_mse_epilogue", "cpu", mse_epilogue_cpu)
register("cosine_rows", "torch", _eager.cosine_rows_torch)
register("cosine_rows", "triton", cosine_triton_op, aot_configs=_TRITON_AOT, max_cols=MAX_COSINE_WIDTH,
         fallback="torch")
register("cosine_rows", "cpu", cosine_rows_cpu)
register("feature_map", "torch", _eager.feature_map_torch)
