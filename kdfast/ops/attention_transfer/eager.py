"""The ``"torch"`` backend of the attention_transfer family: its contracts in eager PyTorch, usable
on any device (the contracts are in :mod:`kdfast.ops.attention_transfer`)."""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast.ops.dtypes import acc_dtype


def attention_transfer_fwd_bwd_torch(
    q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, key_valid: Tensor, row_weight: Tensor,
    scale_s: float, scale_t: float, mse: bool, window: int, need_grad: bool, chunk_elems: int = 1 << 19,
) -> tuple[Tensor, Tensor, Tensor]:
    """The flash attention-transfer contract in eager PyTorch, in chunks of query rows.

    Inputs: q_s, k_s [B, H, L, ds], q_t, k_t [B, H, L, dt], ``key_valid`` [B, L] bool,
    ``row_weight`` [B, L] (w_i: 0 on uncounted query rows). Scores s = scale_s q_s k_s^T and
    t = scale_t q_t k_t^T are formed for ``C`` query rows at a time, C * B * H * L <=
    ``chunk_elems`` (at least 4 rows), so memory is O(B H L C), never O(B H L^2). ``window`` = w >= 0
    keeps only the keys with |i - j| <= w of each row i (-1: every key): a chunk of rows
    [i0, i1) then forms its scores against the keys [i0 - w, i1 + w) alone, C <= 2 w + 2, so a
    local layer costs O(B H L w).

    Returns ``(loss_rows [B, H, L], dq_s, dk_s)``: loss rows w_i * row_loss_i in float32
    (float64 for float64 input) and, when ``need_grad``, the gradients of their sum (empty
    tensors otherwise). Row losses and dS = d(sum)/d s_ij on valid keys j:
        kl:  sum_j A_t,ij (log A_t,ij - log A_s,ij),   dS = w_i (A_s,ij - A_t,ij)
        mse: sum_j (s_ij - t_ij)^2,                      dS = 2 w_i (s_ij - t_ij)
    then dq_s = scale_s dS k_s and dk_s = scale_s dS^T q_s.
    """
    acc = acc_dtype(q_s.dtype)
    B, H, L, _ = q_s.shape
    kv = key_valid[:, None, None, :]                           # [B, 1, 1, L]
    w = row_weight.to(acc)[:, None, :].expand(B, H, L)         # [B, H, L]
    counted = w != 0
    zero = torch.zeros((), dtype=acc, device=q_s.device)
    # Padding rows of Q / K may hold anything, even NaN. The teacher's only reach scores that are
    # masked out below; the student's also enter the gradient GEMMs (0 * NaN = NaN), so padded
    # student keys are zeroed -- with a copy only when they are not finite (always under compile),
    # and padded student queries chunk by chunk.
    kt, qt = k_t.to(acc), q_t.to(acc)
    ks = k_s.to(acc)
    key_pad = ~key_valid[:, None, :, None]
    # (indexing the padded rows reads only them; masked_select would expand the mask to K's size)
    if torch.compiler.is_compiling() or not bool(torch.isfinite(k_s.transpose(1, 2)[~key_valid]).all()):
        ks = torch.where(key_pad, zero, ks)
    loss_rows = torch.zeros(B, H, L, dtype=acc, device=q_s.device)
    dq = torch.zeros(q_s.shape, dtype=acc, device=q_s.device) if need_grad else q_s.new_empty(0)
    dk = torch.zeros(k_s.shape, dtype=acc, device=k_s.device) if need_grad else k_s.new_empty(0)
    banded = 0 <= window < L - 1
    if banded:
        chunk = max(4, min(2 * window + 2, chunk_elems // max(1, B * H * min(L, 4 * window + 2))))
    else:
        chunk = max(4, chunk_elems // max(1, B * H * L))
    pos = torch.arange(L, device=q_s.device)
    for i0 in range(0, L, chunk):
        i1 = min(L, i0 + chunk)
        j0, j1 = (max(0, i0 - window), min(L, i1 + window)) if banded else (0, L)
        qs = torch.where(counted[:, :, i0:i1, None], q_s[:, :, i0:i1].to(acc), zero)  # [B, H, C, ds]
        ks_c = ks[:, :, j0:j1]
        s = (qs @ ks_c.transpose(-1, -2)) * scale_s                   # [B, H, C, J]
        t = (qt[:, :, i0:i1] @ kt[:, :, j0:j1].transpose(-1, -2)) * scale_t
        wc = w[:, :, i0:i1, None]
        keys = kv[..., j0:j1]
        if banded:
            keys = keys & ((pos[i0:i1, None] - pos[None, j0:j1]).abs() <= window)
        valid = counted[:, :, i0:i1, None] & keys
        if mse:
            diff = torch.where(valid, s - t, zero)
            del s, t
            loss_rows[:, :, i0:i1] = (diff * diff).sum(-1)
            ds = diff.mul_(2 * wc) if need_grad else None
        else:
            neg_inf = torch.full((), -float("inf"), dtype=acc, device=q_s.device)
            log_ps = torch.where(keys, s, neg_inf).log_softmax(-1)
            del s
            log_pt = torch.where(keys, t, neg_inf).log_softmax(-1)
            del t
            p_t = log_pt.exp()
            # p_t (log p_t - log p_s), written into log_pt's buffer; 0 at masked keys (0 * NaN otherwise)
            terms = torch.where(valid, log_pt.sub_(log_ps).mul_(p_t), zero)
            loss_rows[:, :, i0:i1] = terms.sum(-1)
            del terms, log_pt
            ds = torch.where(valid, log_ps.exp_().sub_(p_t).mul_(wc), zero) if need_grad else None
            del log_ps, p_t
        if need_grad:
            dq[:, :, i0:i1] = (ds @ ks_c) * scale_s
            # accumulate in place: a temporary [B, H, L, d] per chunk would cost as much as dk itself
            dk.view(B * H, L, -1)[:, j0:j1].baddbmm_(ds.reshape(B * H, i1 - i0, j1 - j0).transpose(1, 2),
                                                     qs.reshape(B * H, i1 - i0, -1), alpha=scale_s)
        del ds
    loss_rows = torch.where(counted, w * loss_rows, zero)
    if need_grad:
        dq, dk = dq.to(q_s.dtype), dk.to(k_s.dtype)
    return loss_rows, dq, dk
