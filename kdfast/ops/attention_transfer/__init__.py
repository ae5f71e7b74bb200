r"""Kernel family attention_transfer: attention KL / score MSE from Q and K, and attention KL on maps.

Two ops, each "loss rows plus the gradient, in the forward" (the teacher is frozen, so the
gradient with respect to the student is known once a row is done; the losses' backward only
scales it, :func:`kdfast.losses._autograd.scale_stored_grad`).

``attention_transfer`` (flash form, :func:`kdfast.flash_attention_transfer`)::

    fn(q_s, k_s, q_t, k_t, key_valid, row_weight, scale_s, scale_t, mse, window, need_grad) -> (rows, dq_s, dk_s)

q_s, k_s [B, H, L, ds], q_t, k_t [B, H, L, dt] (one float dtype; teacher heads already mapped onto
the student's, :func:`kdfast.losses.map_teacher_heads`), key_valid [B, L] bool, row_weight [B, L]
(w_i: 0 on uncounted query rows), window an int: -1 for global attention, w >= 0 for a local
(sliding-window) layer. The keys of query row i are

    K_i = {j : key_valid[b, j]}                          (window = -1)
    K_i = {j : key_valid[b, j] and |i - j| <= w}         (window = w >= 0; positions are the
                                                          indices 0 .. L-1 of the row)

(ModernBERT's local attention: a key outside the band is not part of the row's softmax,
probability exactly 0; w >= L - 1 is global). Packed rows (several documents in one row of L,
:func:`kdfast.data.pack_texts`) attend across their documents as the model does; padding is
key_valid = 0. With s = scale_s q_s k_s^T, t = scale_t q_t k_t^T over j in K_i:

    kl:  row_i = sum_j A_t,ij (log A_t,ij - log A_s,ij),   A = softmax over valid j,
         dS_ij = w_i (A_s,ij - A_t,ij)
    mse: row_i = sum_j (s_ij - t_ij)^2,                     dS_ij = 2 w_i (s_ij - t_ij)
    dq_s = scale_s dS k_s,   dk_s = scale_s dS^T q_s

dS_ij = 0 for j not in K_i (a row with K_i empty has loss 0 and no gradient). Returns loss rows
w_i row_i [B, H, L] in the accumulation dtype (float32; float64 for float64 on torch / cpu) and,
when ``need_grad``, dq_s, dk_s in the inputs' dtype (empty tensors otherwise).
Memory: never an L x L map (torch: chunks of query rows; Triton and C++: O(B H L) plus per-thread
strips).

Algorithm (every backend; FlashAttention-style tiling of the L x L plane into query blocks of BM
rows and key blocks of BN columns, never stored):

    for each (b, h) and query block I = [i0, i0 + BM):
        keys J = [i0 - w, i0 + BM - 1 + w] clipped to [0, L)   (all of [0, L) when global)
        for each key block of J (Triton; the C++ kernel takes J as one strip, the torch backend
        as one chunk):
            S = scale_s Q_s[I] K_s[J]^T,  T = scale_t Q_t[I] K_t[J]^T
            mask M_ij = key_valid[j] and |i - j| <= w       (-inf in both before the soft-max)
            kl: online soft-max of S and T (running max and sum per row) and the running
                sum_j e^{t_ij - m_t} (t_ij - s_ij); mse: the running sum of (s_ij - t_ij)^2 over M
        row loss from the running sums, lse_s and lse_t kept per row (O(B H L))
    backward (Triton: a dQ pass over the key blocks of J and a dK pass over the query blocks
    within w of each key block; C++: from the strip kept in cache):
        dS = M * w_i (e^{S - lse_s} - e^{T - lse_t})  (kl)  or  M * 2 w_i (S - T)  (mse)
        dQ_s[I] += scale_s dS K_s[J],  dK_s[J] += scale_s dS^T Q_s[I]

Only the key blocks that meet the band of a query block are computed or read, so a local layer
costs O(B H L w (ds + dt)) work and a global one O(B H L^2 (ds + dt)), both in O(B H L) memory.
Backends: ``torch`` (:mod:`.eager`), ``triton`` (:mod:`.triton`, the custom op
``kdfast::attention_transfer_triton`` below), ``cpu`` (``torch.ops.kdfast.attention_transfer_fwd_bwd``,
csrc/ops/attention_transfer/cpu.cpp).

``attention_kl_maps`` (:func:`kdfast.attention_kl_loss` on materialised maps)::

    fn(s, t, key_valid, row_weight, window, need_grad) -> (rows, grad)

s, t [B, H, L, L] pre-softmax scores (one float dtype), key_valid [B, L] bool or None (every key
valid), row_weight [B, L] as above, window as above (-1: global). Over the keys K_i of row
(b, h, i) (the valid keys, within the band |i - j| <= window when window >= 0):

    row = w_i sum_{j in K_i} A_t,j (log A_t,j - log A_s,j),   A = softmax over K_i,
    grad_j = w_i (A_s,j - A_t,j) on K_i, 0 elsewhere (and on uncounted rows)

computed as the logit-KD row at T = 1 (a row whose KL is below 1 recomputed without cancellation,
csrc/common/kd_math.h). Backends: ``cpu`` (``torch.ops.kdfast.attention_kl_maps_fwd_bwd``, which
skips invalid keys in place and reads only the band of a windowed row: no masked copy of either
map), and ``torch`` / ``triton`` / ``cuda``, the logit-KD family's ``kd_rows`` kernels
(:mod:`kdfast.ops.logit_kd`) on the B H L rows with invalid keys set to finfo.min in both maps
(probability exactly 0, and t - s = 0 there); for a window with 2 w + 1 < L, on the [B H L, 2 w + 1]
band rows gathered from the maps (the rest of the maps is never read; the gradient map is 0 there).

Importing this package registers both ops' implementations; it never imports triton (the kernel
module is imported inside the custom op on first use).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast import backend as _backend
from kdfast.ops.attention_transfer.eager import attention_transfer_fwd_bwd_torch
from kdfast.ops.dtypes import acc_dtype
from kdfast.ops.logit_kd import OP as KD_ROWS_OP
from kdfast.ops.registry import register, select

FLASH_OP = "attention_transfer"
MAPS_KL_OP = "attention_kl_maps"
_TRITON_CONFIGS = "kdfast.ops.attention_transfer.triton:AOT_CONFIGS"


# --- from Q and K --------------------------------------------------------------------------------

@torch.library.custom_op("kdfast::attention_transfer_triton", mutates_args=())
def attention_transfer_triton(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, key_valid: Tensor,
                              row_weight: Tensor, scale_s: float, scale_t: float, mse: bool, window: int,
                              need_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The ``attention_transfer`` contract on the Triton kernels (loss rows in float32)."""
    from kdfast.ops.attention_transfer.triton import attention_transfer_fwd_bwd_triton

    return attention_transfer_fwd_bwd_triton(q_s, k_s, q_t, k_t, key_valid, row_weight, scale_s, scale_t, mse,
                                             need_grad, window=window)


@attention_transfer_triton.register_fake
def _(q_s, k_s, q_t, k_t, key_valid, row_weight, scale_s, scale_t, mse, window, need_grad):
    B, H, L, _ = q_s.shape
    rows = q_s.new_empty(B, H, L, dtype=torch.float32)
    if not need_grad:
        return rows, q_s.new_empty(0), k_s.new_empty(0)
    return rows, torch.empty_like(q_s, memory_format=torch.contiguous_format), \
        torch.empty_like(k_s, memory_format=torch.contiguous_format)


# The widest heads the Triton kernels tile on a GPU without spilling registers: student and teacher heads
# (grouped teacher heads concatenated) up to 64 (ptxas -v, kdfast.ops.aot --report; the reasons beside the
# tiles in .triton). The registry sees the flash op's width as flash_cols(ds, dt) = max(ds, dt); wider
# heads run on the torch backend (also under backend="triton": its fallback).
MAX_TRITON_HEAD_DIMS = (64, 64)


def triton_takes_heads(ds: int, dt: int) -> bool:
    """Whether the Triton kernels' GPU tiles take a student head of ``ds`` and a teacher head of ``dt``."""
    return ds <= MAX_TRITON_HEAD_DIMS[0] and dt <= MAX_TRITON_HEAD_DIMS[1]


def flash_cols(ds: int, dt: int) -> int:
    """The width the registry holds the ``attention_transfer`` implementations' ``max_cols`` to: the wider
    head, ``max(ds, dt)``, at most ``MAX_TRITON_HEAD_DIMS[0]`` exactly when :func:`triton_takes_heads`."""
    return max(ds, dt)


register(FLASH_OP, "torch", attention_transfer_fwd_bwd_torch)
register(FLASH_OP, "triton", attention_transfer_triton, aot_configs=_TRITON_CONFIGS,
         max_cols=MAX_TRITON_HEAD_DIMS[0], fallback="torch")


# --- attention KL on maps --------------------------------------------------------------------------

def band_mask(L: int, window: int, device: torch.device) -> Tensor | None:
    """[L, L] bool, True where |i - j| <= window; None for a global layer (window -1 or >= L - 1)."""
    if window < 0 or window >= L - 1:
        return None
    pos = torch.arange(L, device=device)
    return (pos[:, None] - pos[None, :]).abs() <= window


def _filled_rows(s: Tensor, t: Tensor, key_valid: Tensor | None, window: int) -> tuple[Tensor, Tensor]:
    """[B H L, L] rows of both maps with the keys outside K_i at finfo.min (probability 0, t - s = 0)."""
    L = s.shape[-1]
    keys = None if key_valid is None else key_valid[:, None, None, :]
    band = band_mask(L, window, s.device)
    if band is not None:
        keys = band if keys is None else keys & band
    if keys is not None:
        fill = torch.finfo(s.dtype).min
        s, t = s.masked_fill(~keys, fill), t.masked_fill(~keys, fill)
    s2, t2 = s.reshape(-1, L), t.reshape(-1, L)
    return (s2 if s2.stride(-1) == 1 else s2.contiguous()), (t2 if t2.stride(-1) == 1 else t2.contiguous())


def _band_rows(s: Tensor, t: Tensor, key_valid: Tensor | None, window: int) -> tuple[Tensor, Tensor, Tensor]:
    """The band of a local layer (2 w + 1 < L) as [B H L, 2 w + 1] rows of both maps, key j = i - w + c
    in column c, finfo.min outside [0, L) and at invalid keys; plus the [B, H, L, 2 w + 1] column
    indices (clamped into [0, L)) to scatter the gradient back."""
    B, H, L, _ = s.shape
    pos = torch.arange(L, device=s.device)
    cols = pos[:, None] + torch.arange(-window, window + 1, device=s.device)[None, :]   # [L, 2w + 1]
    inside = (cols >= 0) & (cols < L)
    cols = cols.clamp(0, L - 1)
    keep = inside[None] if key_valid is None else inside[None] & key_valid[:, cols]      # [B or 1, L, 2w + 1]
    idx = cols.expand(B, H, L, 2 * window + 1)
    fill = torch.finfo(s.dtype).min
    sb = s.gather(-1, idx).masked_fill_(~keep[:, None], fill)
    tb = t.gather(-1, idx).masked_fill_(~keep[:, None], fill)
    return sb.reshape(-1, 2 * window + 1), tb.reshape(-1, 2 * window + 1), idx


def _maps_kl_on_kd_rows(backend: str):
    """The ``attention_kl_maps`` contract on ``backend``'s implementation of the logit-KD family's op
    ``kd_rows`` (:mod:`kdfast.ops.logit_kd`) at T = 1, KL only."""

    def run(s: Tensor, t: Tensor, key_valid: Tensor | None, row_weight: Tensor, window: int,
            need_grad: bool) -> tuple[Tensor, Tensor]:
        B, H, L, _ = s.shape
        narrow = 0 <= window and 2 * window + 1 < L
        if narrow:
            s2, t2, idx = _band_rows(s, t, key_valid, window)
        else:
            s2, t2 = _filled_rows(s, t, key_valid, window)
        weights = row_weight[:, None, :].expand(B, H, L).reshape(-1).contiguous()
        labels = torch.zeros(s2.shape[0], dtype=torch.int64, device=s.device)
        grad = torch.empty(s2.shape, dtype=s.dtype, device=s.device)
        rows = select(KD_ROWS_OP, backend, s2).fn(s2, t2, labels, weights, grad, 1.0, 1.0, 0.0, False)
        if not need_grad:
            return rows.view(B, H, L), s.new_empty(0)
        if narrow:  # columns clamped into [0, L) carry a gradient of exactly 0: adding them changes nothing
            grad = torch.zeros(B, H, L, L, dtype=s.dtype, device=s.device).scatter_add_(
                -1, idx, grad.view(B, H, L, 2 * window + 1))
        return rows.view(B, H, L), grad.view(B, H, L, L)

    run.__name__ = run.__qualname__ = f"attention_kl_maps_on_kd_rows_{backend}"
    return run


for _name in ("torch", "triton", "cuda"):
    register(MAPS_KL_OP, _name, _maps_kl_on_kd_rows(_name))


# --- the compiled C++ ops (csrc/ops/attention_transfer/cpu.cpp) ----------------------------------

def _has_window(op_name: str) -> bool:
    """Whether the built extension has ``op_name`` with its ``window`` argument: one built before
    windows existed lacks it, and its cpu backend is then left out of the registry (kdfast backends
    says so) until a rebuild."""
    op = getattr(torch.ops.kdfast, op_name, None)
    return op is not None and any(a.name == "window" for a in op.default._schema.arguments)


if _backend._extension()[0] is not None and _has_window("attention_transfer_fwd_bwd"):

    @torch.library.register_fake("kdfast::attention_transfer_fwd_bwd")
    def _(q_s, k_s, q_t, k_t, key_valid, row_weight, scale_s, scale_t, mse, window, need_grad):
        rows = q_s.new_empty(q_s.shape[:3], dtype=row_weight.dtype)
        if not need_grad:
            return rows, q_s.new_empty(0), k_s.new_empty(0)
        return rows, q_s.new_empty(q_s.shape), k_s.new_empty(k_s.shape)

    register(FLASH_OP, "cpu", torch.ops.kdfast.attention_transfer_fwd_bwd)

# An extension built before this op (or its window) existed lacks it: the cpu backend of
# attention_kl_loss is then missing from the registry (kdfast backends says so) until a rebuild.
if _backend._extension()[0] is not None and _has_window("attention_kl_maps_fwd_bwd"):

    @torch.library.register_fake("kdfast::attention_kl_maps_fwd_bwd")
    def _(s, t, key_valid, row_weight, window, need_grad):
        rows = s.new_empty(s.shape[:3], dtype=acc_dtype(s.dtype))
        return rows, (s.new_empty(s.shape) if need_grad else s.new_empty(0))

    def attention_kl_maps_cpu(s: Tensor, t: Tensor, key_valid: Tensor | None, row_weight: Tensor, window: int,
                              need_grad: bool) -> tuple[Tensor, Tensor]:
        """The ``attention_kl_maps`` contract on the C++ kernel (invalid keys skipped, never copied)."""
        if key_valid is None:
            key_valid = torch.ones(s.shape[0], s.shape[2], dtype=torch.bool, device=s.device)
        return torch.ops.kdfast.attention_kl_maps_fwd_bwd(s, t, key_valid, row_weight, window, need_grad)

    register(MAPS_KL_OP, "cpu", attention_kl_maps_cpu)
