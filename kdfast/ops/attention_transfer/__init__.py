r"""Kernel family attention_transfer: attention KL / score MSE from Q and K, and attention KL on maps.

Two ops, each "loss rows plus the gradient, in the forward" (the teacher is frozen, so the
gradient with respect to the student is known once a row is done; the losses' backward only
scales it, :func:`kdfast.losses._autograd.scale_stored_grad`).

``attention_transfer`` (flash form, :func:`kdfast.flash_attention_transfer`)::

    fn(q_s, k_s, q_t, k_t, key_valid, row_weight, scale_s, scale_t, mse, need_grad) -> (rows, dq_s, dk_s)

q_s, k_s [B, H, L, ds], q_t, k_t [B, H, L, dt] (one float dtype; teacher heads already mapped onto
the student's, :func:`kdfast.losses.map_teacher_heads`), key_valid [B, L] bool, row_weight [B, L]
(w_i: 0 on uncounted query rows). With s = scale_s q_s k_s^T, t = scale_t q_t k_t^T over the valid
keys j of each query row i:

    kl:  row_i = sum_j A_t,ij (log A_t,ij - log A_s,ij),   A = softmax over valid j,
         dS_ij = w_i (A_s,ij - A_t,ij)
    mse: row_i = sum_j (s_ij - t_ij)^2,                     dS_ij = 2 w_i (s_ij - t_ij)
    dq_s = scale_s dS k_s,   dk_s = scale_s dS^T q_s

returns loss rows w_i row_i [B, H, L] in the accumulation dtype (float32; float64 for float64 on
torch / cpu) and, when ``need_grad``, dq_s, dk_s in the inputs' dtype (empty tensors otherwise).
Memory: never an L x L map (torch: chunks of query rows; Triton and C++: O(B H L) plus per-thread
strips). Backends: ``torch`` (:mod:`.torch`), ``triton`` (:mod:`.triton`, the custom op
``kdfast::attention_transfer_triton`` below), ``cpu`` (``torch.ops.kdfast.attention_transfer_fwd_bwd``,
csrc/ops/attention_transfer/cpu.cpp).

``attention_kl_maps`` (:func:`kdfast.attention_kl_loss` on materialised maps)::

    fn(s, t, key_valid, row_weight, need_grad) -> (rows, grad)

s, t [B, H, L, L] pre-softmax scores (one float dtype), key_valid [B, L] bool or None (every key
valid), row_weight [B, L] as above. Over the valid keys K_b of row (b, h, i):

    row = w_i sum_{j in K_b} A_t,j (log A_t,j - log A_s,j),   A = softmax over K_b,
    grad_j = w_i (A_s,j - A_t,j) on K_b, 0 elsewhere (and on uncounted rows)

computed as the logit-KD row at T = 1 (a row whose KL is below 1 recomputed without cancellation,
csrc/common/kd_math.h). Backends: ``cpu`` (``torch.ops.kdfast.attention_kl_maps_fwd_bwd``, which
skips invalid keys in place: no masked copy of either map), and ``torch`` / ``triton`` / ``cuda``,
the logit-KD family's ``kd_rows`` kernels (:mod:`kdfast.ops.logit_kd`) on the B H L rows with
invalid keys set to finfo.min in both maps (probability exactly 0, and t - s = 0 there).

Importing this package registers both ops' implementations; it never imports triton (the kernel
module is imported inside the custom op on first use).
"""

from __future__ import annotations

# The backend module first: importing it binds this package's name `torch` to it, and the
# `import torch` below must come after, to rebind the name to PyTorch.
from kdfast.ops.attention_transfer.torch import attention_transfer_fwd_bwd_torch

import torch  # noqa: E402
from torch import Tensor

from kdfast import backend as _backend
from kdfast.ops.dtypes import acc_dtype
from kdfast.ops.logit_kd import OP as KD_ROWS_OP
from kdfast.ops.registry import register, select

FLASH_OP = "attention_transfer"
MAPS_KL_OP = "attention_kl_maps"
_TRITON_CONFIGS = "kdfast.ops.attention_transfer.triton:AOT_CONFIGS"


# --- from Q and K --------------------------------------------------------------------------------

@torch.library.custom_op("kdfast::attention_transfer_triton", mutates_args=())
def attention_transfer_triton(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, key_valid: Tensor,
                              row_weight: Tensor, scale_s: float, scale_t: float, mse: bool,
                              need_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The ``attention_transfer`` contract on the Triton kernels (loss rows in float32)."""
    from kdfast.ops.attention_transfer.triton import attention_transfer_fwd_bwd_triton

    return attention_transfer_fwd_bwd_triton(q_s, k_s, q_t, k_t, key_valid, row_weight, scale_s, scale_t, mse,
                                             need_grad)


@attention_transfer_triton.register_fake
def _(q_s, k_s, q_t, k_t, key_valid, row_weight, scale_s, scale_t, mse, need_grad):
    B, H, L, _ = q_s.shape
    rows = q_s.new_empty(B, H, L, dtype=torch.float32)
    if not need_grad:
        return rows, q_s.new_empty(0), k_s.new_empty(0)
    return rows, torch.empty_like(q_s, memory_format=torch.contiguous_format), \
        torch.empty_like(k_s, memory_format=torch.contiguous_format)


register(FLASH_OP, "torch", attention_transfer_fwd_bwd_torch)
register(FLASH_OP, "triton", attention_transfer_triton, aot_configs=_TRITON_CONFIGS)


# --- attention KL on maps --------------------------------------------------------------------------

def _filled_rows(s: Tensor, t: Tensor, key_valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """[B H L, L] rows of both maps with invalid keys at finfo.min (probability 0, t - s = 0)."""
    L = s.shape[-1]
    if key_valid is not None:
        keys = key_valid[:, None, None, :]
        fill = torch.finfo(s.dtype).min
        s, t = s.masked_fill(~keys, fill), t.masked_fill(~keys, fill)
    s2, t2 = s.reshape(-1, L), t.reshape(-1, L)
    return (s2 if s2.stride(-1) == 1 else s2.contiguous()), (t2 if t2.stride(-1) == 1 else t2.contiguous())


def _maps_kl_on_kd_rows(backend: str):
    """The ``attention_kl_maps`` contract on ``backend``'s implementation of the logit-KD family's op
    ``kd_rows`` (:mod:`kdfast.ops.logit_kd`) at T = 1, KL only."""

    def run(s: Tensor, t: Tensor, key_valid: Tensor | None, row_weight: Tensor,
            need_grad: bool) -> tuple[Tensor, Tensor]:
        B, H, L, _ = s.shape
        s2, t2 = _filled_rows(s, t, key_valid)
        weights = row_weight[:, None, :].expand(B, H, L).reshape(-1).contiguous()
        labels = torch.zeros(s2.shape[0], dtype=torch.int64, device=s.device)
        grad = torch.empty(s2.shape, dtype=s.dtype, device=s.device)
        rows = select(KD_ROWS_OP, backend, s2).fn(s2, t2, labels, weights, grad, 1.0, 1.0, 0.0, False)
        return rows.view(B, H, L), (grad.view(B, H, L, L) if need_grad else s.new_empty(0))

    run.__name__ = run.__qualname__ = f"attention_kl_maps_on_kd_rows_{backend}"
    return run


for _name in ("torch", "triton", "cuda"):
    register(MAPS_KL_OP, _name, _maps_kl_on_kd_rows(_name))


# --- the compiled C++ ops (csrc/ops/attention_transfer/cpu.cpp) ----------------------------------

if _backend._extension()[0] is not None:

    @torch.library.register_fake("kdfast::attention_transfer_fwd_bwd")
    def _(q_s, k_s, q_t, k_t, key_valid, row_weight, scale_s, scale_t, mse, need_grad):
        rows = q_s.new_empty(q_s.shape[:3], dtype=row_weight.dtype)
        if not need_grad:
            return rows, q_s.new_empty(0), k_s.new_empty(0)
        return rows, q_s.new_empty(q_s.shape), k_s.new_empty(k_s.shape)

    register(FLASH_OP, "cpu", torch.ops.kdfast.attention_transfer_fwd_bwd)

# An extension built before this op existed lacks it: the cpu backend of attention_kl_loss is then
# missing from the registry (kdfast backends says so; test_attention_losses fails) until a rebuild.
if _backend._extension()[0] is not None and hasattr(torch.ops.kdfast, "attention_kl_maps_fwd_bwd"):

    @torch.library.register_fake("kdfast::attention_kl_maps_fwd_bwd")
    def _(s, t, key_valid, row_weight, need_grad):
        rows = s.new_empty(s.shape[:3], dtype=acc_dtype(s.dtype))
        return rows, (s.new_empty(s.shape) if need_grad else s.new_empty(0))

    def attention_kl_maps_cpu(s: Tensor, t: Tensor, key_valid: Tensor | None, row_weight: Tensor,
                              need_grad: bool) -> tuple[Tensor, Tensor]:
        """The ``attention_kl_maps`` contract on the C++ kernel (invalid keys skipped, never copied)."""
        if key_valid is None:
            key_valid = torch.ones(s.shape[0], s.shape[2], dtype=torch.bool, device=s.device)
        return torch.ops.kdfast.attention_kl_maps_fwd_bwd(s, t, key_valid, row_weight, need_grad)

    register(MAPS_KL_OP, "cpu", attention_kl_maps_cpu)
