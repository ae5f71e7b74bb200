"""Float64 oracles of every kdfast loss: the textbook formula (``log_softmax``, dense maps,
materialised projections), evaluated in float64 and differentiated by autograd. Tests compare every
registered backend against these; nothing in the package imports them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def reduce_rows(rows: Tensor, counted: Tensor, reduction: str, lead_shape: torch.Size) -> Tensor:
    """Per-row losses -> the requested reduction; uncounted rows are 0 (even if they hold NaN).

    ``none``: rows shaped ``lead_shape``; ``sum``: their sum; ``batchmean``/``mean``: the sum over
    the number of counted rows (0 when there is none).
    """
    rows = torch.where(counted, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(lead_shape)
    total = rows.sum()
    return total if reduction == "sum" else total / counted.sum().clamp_min(1)


def kd_loss_reference(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    alpha_kd: float = 1.0,
    alpha_mlm: float = 0.0,
    kind: str = "kl",
    reduction: str = "batchmean",
    kd_rows: str = "all",
) -> Tensor:
    """Float64 oracle of :func:`kdfast.kd_loss`, written the obvious way.

    KD rows K: mask != 0 (``kd_rows="all"``) or label != ignore_index and mask != 0
    (``"masked"``); MLM rows M: label != ignore_index and mask != 0. With p = softmax(t / T) and
    q = softmax(s / T), on each row of K
        kl:      T^2 * sum_j p_j (log p_j - log q_j)
        soft_ce: T^2 * -sum_j p_j log q_j
    times ``alpha_kd``, plus ``alpha_mlm`` * cross-entropy(s, label) at T = 1 on each row of M.
    ``batchmean``/``mean`` divide each term's sum by its number of rows (0 when there are none),
    ``sum`` does not divide and ``none`` returns the per-row losses (0 on uncounted rows).
    Differentiable by autograd.
    """
    V = student_logits.shape[-1]
    s = student_logits.reshape(-1, V).double()
    t = teacher_logits.reshape(-1, V).double()
    kd_valid, mlm_valid = _kd_and_mlm_rows(s.shape[0], labels, mask, ignore_index, kd_rows, s.device)
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    if kind == "kl":
        rows = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    else:
        rows = -(log_p.exp() * log_q).sum(-1)
    return _kd_plus_mlm(alpha_kd * temperature**2 * rows, kd_valid, mlm_valid, s, labels, alpha_mlm, reduction,
                        student_logits.shape[:-1])


def _kd_and_mlm_rows(n: int, labels: Tensor | None, mask: Tensor | None, ignore_index: int, kd_rows: str,
                     device: torch.device) -> tuple[Tensor, Tensor]:
    """(K, M): the KD rows (``kd_rows`` "all": mask != 0; "masked": M) and the labelled rows M."""
    kd_valid = torch.ones(n, dtype=torch.bool, device=device)
    if mask is not None:
        kd_valid &= mask.reshape(-1).bool()
    mlm_valid = kd_valid.clone()
    if labels is not None:
        mlm_valid &= labels.reshape(-1) != ignore_index
    return (mlm_valid if kd_rows == "masked" else kd_valid), mlm_valid


def _kd_plus_mlm(kd: Tensor, kd_valid: Tensor, mlm_valid: Tensor, s: Tensor, labels: Tensor | None,
                 alpha_mlm: float, reduction: str, lead_shape: torch.Size) -> Tensor:
    """The KD rows reduced over K plus alpha_mlm * cross-entropy(s, labels) reduced over M."""
    loss = reduce_rows(kd, kd_valid, reduction, lead_shape)
    if alpha_mlm:
        safe_labels = torch.where(mlm_valid, labels.reshape(-1), 0)
        loss = loss + reduce_rows(alpha_mlm * F.cross_entropy(s, safe_labels, reduction="none"), mlm_valid,
                                  reduction, lead_shape)
    return loss


def sparse_kd_loss_reference(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_values: Tensor,
    *,
    mode: str = "topk",
    temperature: float = 1.0,
    teacher_logsumexp: Tensor | None = None,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    alpha_kd: float = 1.0,
    alpha_mlm: float = 0.0,
    reduction: str = "batchmean",
    kd_rows: str = "all",
) -> Tensor:
    """Float64 oracle of :func:`kdfast.sparse_kd_loss`, written the obvious way (dense, autograd).

    Rows as in :func:`kd_loss_reference` (KD over K, MLM over M, ``kd_rows``).

    topk: the kept teacher logits y_k = v_k / T are normalised by
    lse_t = max(teacher_logsumexp, logsumexp_k y_k) (just logsumexp_k y_k without
    teacher_logsumexp or when K == V); the rest bucket holds 1 - sum_k p_t,k for the teacher
    and the student's soft-max mass outside the kept ids. loss = T^2 KL over K + 1 buckets.
    sampled: q = the per-row normalised weights scattered (summed) onto the vocabulary;
    loss = T^2 KL(q || softmax(s / T)).
    """
    V = student_logits.shape[-1]
    K = teacher_ids.shape[-1]
    T = temperature
    s = student_logits.reshape(-1, V).double()
    ids = teacher_ids.reshape(-1, K).long()
    vals = teacher_values.reshape(-1, K).double()
    N = s.shape[0]
    valid, mlm_valid = _kd_and_mlm_rows(N, labels, mask, ignore_index, kd_rows, s.device)
    # uncounted rows may hold anything: give them harmless ids and values
    ids = torch.where(valid[:, None], ids, torch.arange(K, device=s.device))
    vals = torch.where(valid[:, None], vals, torch.ones_like(vals))
    log_q = F.log_softmax(s / T, dim=-1)
    if mode == "topk":
        y = vals / T
        lse_kept = torch.logsumexp(y, dim=-1)
        lse_t = lse_kept
        if teacher_logsumexp is not None and K < V:
            lse_t = torch.maximum(teacher_logsumexp.reshape(-1).double(), lse_kept)
        log_p = y - lse_t[:, None]
        rows = (log_p.exp() * (log_p - log_q.gather(1, ids))).sum(-1)
        if K < V:
            p_rest = -torch.expm1(lse_kept - lse_t)
            log_q_rest = torch.logsumexp(log_q.scatter(1, ids, float("-inf")), dim=-1)
            rows = rows + torch.xlogy(p_rest, p_rest) - p_rest * log_q_rest
    else:
        w = vals / vals.sum(-1, keepdim=True)
        q_t = torch.zeros_like(s).scatter_add(1, ids, w)
        rows = (torch.xlogy(q_t, q_t) - q_t * log_q).sum(-1)
    return _kd_plus_mlm(alpha_kd * T**2 * rows, valid, mlm_valid, s, labels, alpha_mlm, reduction,
                        student_logits.shape[:-1])


def band_reference(L: int, window: int | None, device: torch.device | str = "cpu") -> Tensor:
    """[L, L] bool, element (i, j) True when key j is in query i's band |i - j| <= window (every
    element for window None: a global layer), built entry by entry."""
    out = torch.ones(L, L, dtype=torch.bool, device=device)
    if window is not None:
        for i in range(L):
            for j in range(L):
                out[i, j] = abs(i - j) <= window
    return out


def attention_mse_reference(student_scores: Tensor, teacher_scores: Tensor, mask: Tensor | None = None,
                            threshold: float = -1e2, window: int | None = None) -> Tensor:
    """Float64 oracle of :func:`kdfast.attention_mse_loss` (TinyBERT attention loss).

    Element (b, h, i, j) of the [B, H, L, L] score maps is counted unless
    ``student <= threshold`` or ``teacher <= threshold`` (an additive mask was applied there),
    or ``mask[b, i] == 0`` or ``mask[b, j] == 0`` (padding as query or as key), or (with
    ``window``) |i - j| > window. Uncounted
    elements are set to 0 in both maps. Returns sum (s - t)^2 / (number of counted elements),
    0 when nothing is counted. Differentiable by autograd.
    """
    s = student_scores.double()
    t = teacher_scores.double()
    # out-of-band elements are never looked at (they may hold anything, NaN included)
    band = band_reference(s.shape[-1], window, s.device)
    s = torch.where(band, s, torch.zeros_like(s))
    t = torch.where(band, t, torch.zeros_like(t))
    counted = (s > threshold) & (t > threshold) & band
    if mask is not None:
        m = mask.bool()
        counted = counted & m[:, None, :, None] & m[:, None, None, :]
    s = torch.where(counted, s, torch.zeros_like(s))
    t = torch.where(counted, t, torch.zeros_like(t))
    return ((s - t) ** 2).sum() / counted.sum().clamp_min(1)


def attention_kl_reference(student_scores: Tensor, teacher_scores: Tensor, mask: Tensor | None = None,
                           window: int | None = None) -> Tensor:
    """Float64 oracle of :func:`kdfast.attention_kl_loss` (MiniLM / MobileBERT attention transfer).

    For each query row (b, h, i) with ``mask[b, i] != 0`` (every row when ``mask`` is None):
    A_t = softmax_j(teacher), A_s = softmax_j(student) over the keys j with ``mask[b, j] != 0``
    (and, with ``window``, |i - j| <= window: a local layer's band; the other keys have
    probability 0 and are never looked at), row loss = sum_j A_t,j (log A_t,j - log A_s,j).
    Returns the mean over counted rows (0 when there are none). Differentiable by autograd.
    """
    s = student_scores.double()
    t = teacher_scores.double()
    B, H, L, _ = s.shape
    if mask is not None:
        m = mask.bool()
        keys = m[:, None, None, :].expand_as(s)
        rows = m[:, None, :].expand(B, H, L)
    else:
        keys = torch.ones_like(s, dtype=torch.bool)
        rows = torch.ones(B, H, L, dtype=torch.bool, device=s.device)
    keys = keys & band_reference(L, window, s.device)
    # rows with no key at all (a fully padded sequence) are not counted: keep them finite
    live = rows & keys.any(-1)
    neg_inf = torch.full_like(s, -float("inf"))
    log_ps = F.log_softmax(torch.where(keys, s, neg_inf), dim=-1)
    log_pt = F.log_softmax(torch.where(keys, t, neg_inf), dim=-1)
    terms = torch.where(keys & live[..., None], log_pt.exp() * (log_pt - log_ps), torch.zeros_like(s))
    kl_rows = terms.sum(-1)
    return kl_rows.sum() / live.sum().clamp_min(1)


def teacher_heads_reference(teacher_scores: Tensor, student_heads: int) -> Tensor:
    """Float64 oracle of the head mapping of the attention losses, head by head.

    [B, H_t, L, L] scores -> [B, H_s, L, L]: with H_t = g H_s, student head h gets the mean of
    teacher heads h g .. h g + g - 1; with H_s = g H_t, teacher head h // g.
    """
    t = teacher_scores.double()
    H_t = t.shape[1]
    heads = []
    for h in range(student_heads):
        if H_t >= student_heads:
            g = H_t // student_heads
            heads.append(sum(t[:, h * g + j] for j in range(g)) / g)
        else:
            heads.append(t[:, h // (student_heads // H_t)])
    return torch.stack(heads, dim=1)


def attention_scores_reference(q: Tensor, k: Tensor, scale: float, key_mask: Tensor | None = None,
                               window: int | None = None) -> Tensor:
    """Materialised float64 scores ``scale * q @ k^T`` plus the additive key mask (``finfo.min``
    at ``key_mask == 0``, as transformers' eager attention, and, with ``window``, outside the
    band |i - j| <= window, as ModernBERT's local layers): what
    :func:`kdfast.flash_attention_transfer` computes without ever storing."""
    scores = scale * (q.double() @ k.double().transpose(-1, -2))
    if key_mask is not None:
        add = torch.zeros(key_mask.shape, dtype=scores.dtype, device=scores.device)
        add = add.masked_fill(~key_mask.bool(), torch.finfo(torch.float64).min)
        scores = scores + add[:, None, None, :]
    if window is not None:
        band = band_reference(scores.shape[-1], window, scores.device)
        scores = scores.masked_fill(~band, torch.finfo(torch.float64).min)
    return scores


def _token_weights(lead_shape: torch.Size, mask: Tensor | None, device: torch.device) -> Tensor:
    """Float64 [N] indicator of the counted tokens (every token when ``mask`` is None)."""
    if mask is None:
        return torch.ones(lead_shape, dtype=torch.float64, device=device).reshape(-1)
    return (mask.reshape(-1) != 0).to(torch.float64)


def hidden_mse_reference(student_hidden: Tensor, teacher_hidden: Tensor, proj_weight: Tensor | None = None,
                         proj_bias: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    """Float64 oracle of :func:`kdfast.hidden_mse_loss` (TinyBERT hidden / embedding loss).

    Y = h_s W^T + b (Y = h_s without a projection); returns sum over counted tokens and the d_t
    features of (Y - h_t)^2, divided by (number of counted tokens) * d_t; 0 when none is counted.
    Differentiable by autograd in the student states, the weight and the bias.
    """
    hs = student_hidden.double().reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.double().reshape(-1, teacher_hidden.shape[-1])
    y = hs if proj_weight is None else hs @ proj_weight.double().T
    if proj_bias is not None:
        y = y + proj_bias.double()
    w = _token_weights(student_hidden.shape[:-1], mask, hs.device)
    diff = torch.where(w[:, None] != 0, y - ht, torch.zeros((), dtype=torch.float64, device=hs.device))
    return (diff * diff).sum() / (w.sum() * ht.shape[-1]).clamp_min(1)


def cosine_reference(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None,
                     eps: float = 1e-8) -> Tensor:
    """Float64 oracle of :func:`kdfast.cosine_loss` (DistilBERT L_cos): the mean over counted tokens
    of 1 - s.t / (max(|s|, eps) max(|t|, eps)); 0 when none is counted. Differentiable by autograd."""
    s = student_hidden.double().reshape(-1, student_hidden.shape[-1])
    t = teacher_hidden.double().reshape(-1, teacher_hidden.shape[-1])
    cos = (s * t).sum(-1) / (s.norm(dim=-1).clamp_min(eps) * t.norm(dim=-1).clamp_min(eps))
    w = _token_weights(student_hidden.shape[:-1], mask, s.device)
    return torch.where(w != 0, 1 - cos, torch.zeros_like(cos)).sum() / w.sum().clamp_min(1)


def feature_map_reference(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None,
                          eps: float = 1e-5, beta_mean: float = 1.0, beta_var: float = 1.0) -> Tensor:
    """Float64 oracle of :func:`kdfast.feature_map_loss` (MobileBERT feature-map transfer).

    Per token, mu and var (biased) over the hidden dimension, n = (h - mu) / sqrt(var + eps);
    returns, with means over the counted tokens (and over d for the first term),
        mean (n_s - n_t)^2 + beta_mean mean (mu_s - mu_t)^2 + beta_var mean |var_s - var_t|.
    Differentiable by autograd.
    """
    s = student_hidden.double().reshape(-1, student_hidden.shape[-1])
    t = teacher_hidden.double().reshape(-1, teacher_hidden.shape[-1])
    w = _token_weights(student_hidden.shape[:-1], mask, s.device)
    n = w.sum().clamp_min(1)
    mu_s, mu_t = s.mean(-1), t.mean(-1)
    var_s, var_t = s.var(-1, unbiased=False), t.var(-1, unbiased=False)
    ns = (s - mu_s[:, None]) / (var_s[:, None] + eps).sqrt()
    nt = (t - mu_t[:, None]) / (var_t[:, None] + eps).sqrt()
    fm = (w[:, None] * (ns - nt) ** 2).sum() / (n * s.shape[-1])
    mean_term = (w * (mu_s - mu_t) ** 2).sum() / n
    var_term = (w * (var_s - var_t).abs()).sum() / n
    return fm + beta_mean * mean_term + beta_var * var_term
