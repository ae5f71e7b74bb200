"""Hidden-state transfer: TinyBERT projected MSE, DistilBERT cosine, MobileBERT feature maps.

Public: :func:`hidden_mse_loss` / :class:`HiddenMSELoss`, :func:`cosine_loss`,
:func:`feature_map_loss`.

Hidden states are [..., d] (e.g. [B, L, d]); the optional ``mask`` has their leading shape
(nonzero = real token, 0 = padding) and removes padded tokens from both the sum and the count.

Fusion. :func:`hidden_mse_loss` never keeps the projected states Y = h_s W_p^T + b_p: its forward
walks over chunks of rows, computes the chunk of Y with the library GEMM (fp32 accumulation),
turns it in place into the loss rows and dY = 2 (Y - h_t) / n (Triton or C++ epilogue
kernel, or eager torch), and immediately folds dY into the gradients dh_s = dY W_p, dW_p += dY^T h_s,
db_p += sum dY (fp32 accumulators). Only one chunk of Y ever exists; backward just scales the
stored gradients by the upstream gradient. :func:`cosine_loss` likewise computes the loss and
its gradient in one pass over the rows (Triton or C++ row kernel, or eager torch).

The row kernels are the ops of :mod:`kdfast.ops.hidden_rows` (their contract, and where each backend
lives); :mod:`kdfast.ops.registry` picks the backend: ``auto`` (Triton on CUDA tensors when it works,
the C++ CPU kernels on CPU tensors when ``kdfast._C`` is built, else torch), ``triton``, ``cpu``,
``torch``; ``cuda`` has no kernel for these losses and raises. :func:`feature_map_loss` is eager torch
only (differentiated by autograd).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from kdfast.losses._autograd import scale_stored_grad
from kdfast.losses._checks import (
    acc_dtype,
    check_nonnegative,
    check_positive,
    check_same_dtype_device,
    check_tensor,
    explain_non_finite,
    mask_row_weights,
)
from kdfast.ops import hidden_rows as _hidden_rows  # noqa: F401  (registers the family's ops)
from kdfast.ops import registry

# Rows per chunk of the fused projection: C = max(16, CHUNK_ELEMS // d_t), so a chunk of Y holds
# about CHUNK_ELEMS fp32 values (4 MiB). Module-level so that tests can shrink it.
CHUNK_ELEMS = 1 << 20


def _check_states(student_hidden: Tensor, teacher_hidden: Tensor, same_width: bool) -> None:
    check_tensor("student_hidden", student_hidden, min_dim=1)
    check_tensor("teacher_hidden", teacher_hidden, min_dim=1)
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(f"teacher_hidden shape mismatch: teacher_hidden {tuple(teacher_hidden.shape)} vs "
                         f"student_hidden {tuple(student_hidden.shape)} (all but the last dimension must agree)")
    if same_width and teacher_hidden.shape[-1] != student_hidden.shape[-1]:
        raise ValueError(f"teacher_hidden width mismatch: teacher_hidden has width {teacher_hidden.shape[-1]}, "
                         f"student_hidden {student_hidden.shape[-1]}; this loss needs equal widths")
    check_same_dtype_device("student_hidden", student_hidden, "teacher_hidden", teacher_hidden)
    if student_hidden.numel() == 0 or teacher_hidden.numel() == 0:
        raise ValueError(f"student_hidden is empty (shape {tuple(student_hidden.shape)})")


def _counted_inputs(w: Tensor, named: list[tuple[str, Tensor | None]], width_rows: bool = True):
    """For `explain_non_finite`: the rows of the [..., d] states that count (``w != 0`` over the
    flattened rows), the other tensors (projections) whole; evaluated on the failure path only."""
    def gather() -> list[tuple[str, Tensor | None]]:
        keep = (w != 0).reshape(-1)
        out = []
        for name, x in named:
            if x is not None and name.endswith("_hidden") and width_rows:
                rows = x.reshape(-1, x.shape[-1])
                x = rows[keep.repeat(rows.shape[0] // keep.numel())] if rows.shape[0] % keep.numel() == 0 else rows
            out.append((name, x))
        return out
    return gather


def _rows(x: Tensor) -> Tensor:
    """[..., d] -> a contiguous [N, d] view (copied only when needed)."""
    return x.reshape(-1, x.shape[-1]).contiguous()


# --- TinyBERT hidden MSE through a projection ----------------------------------------------------

def hidden_mse_fwd_bwd(hs: Tensor, ht: Tensor, weight: Tensor | None, bias: Tensor | None, w: Tensor,
                       epilogue: Callable, need: tuple[bool, bool, bool], chunk_rows: int, masked: bool = True
                       ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Chunked fused projection + MSE over n layers at once: returns (loss, dh_s, dW_p, db_p).

    ``hs`` [n, N, d_s], ``ht`` [n, N, d_t] contiguous: N rows of each of n layers, layer l
    projected by ``weight[l]`` [d_t, d_s] (+ ``bias[l]`` [d_t]); ``w`` [n, N] row weights in
    the accumulation dtype (``masked``: some may be 0). The loss is sum_l sum_r w_lr |Y_lr -
    h_t,lr|^2. ``need`` says which of (dh_s, dW_p, db_p) to compute (the others come back
    None, as do those of absent parameters). Each chunk takes ``chunk_rows`` rows of every
    layer: one batched GEMM for all layers, one ``epilogue`` (the ``hidden_mse_epilogue`` op's
    implementation the registry selected) over the n * chunk_rows rows. dh_s has ``hs``'s dtype, dW_p / db_p the
    parameters' dtypes.
    """
    acc = w.dtype
    n, N, d_t = hs.shape[0], hs.shape[1], ht.shape[-1]
    W = weight.to(acc) if weight is not None else None
    b = bias.to(acc)[:, None, :] if bias is not None else None
    loss = torch.zeros((), dtype=acc, device=hs.device)
    dh = torch.empty_like(hs) if need[0] else None
    dW = torch.zeros_like(W) if need[1] and W is not None else None
    db = torch.zeros_like(b) if need[2] and b is not None else None
    for i0 in range(0, N, chunk_rows):
        i1 = min(N, i0 + chunk_rows)
        x = hs[:, i0:i1].to(acc)                                       # [n, C, d_s]
        w_rows = w[:, i0:i1].reshape(-1)
        if masked:  # padded rows may hold anything: keep them out of Y and of dW_p = dY^T h_s
            x = x.masked_fill((w[:, i0:i1] == 0)[..., None], 0.0)
        if W is None:
            y = x.clone(memory_format=torch.contiguous_format)
        elif b is None:
            y = torch.bmm(x, W.transpose(1, 2))
        else:
            y = torch.baddbmm(b, x, W.transpose(1, 2))
        t_rows = ht[:, i0:i1].reshape(-1, d_t)                         # a view when n == 1
        y_rows = y.view(-1, d_t)
        rows = epilogue(y_rows, t_rows, w_rows)
        loss = loss + rows.to(acc).sum()
        # y now holds dY
        if dh is not None:
            if W is not None and dh.dtype == acc and n == 1:
                torch.bmm(y, W, out=dh[:, i0:i1])  # rows of a contiguous tensor: a contiguous view
            else:
                dh[:, i0:i1] = y if W is None else torch.bmm(y, W)
        if dW is not None:
            dW.baddbmm_(y.transpose(1, 2), x)
        if db is not None:
            db.add_(y.sum(1, keepdim=True))
        del y, x
    if dW is not None:
        dW = dW.to(weight.dtype)
    if db is not None:
        db = db.to(bias.dtype).squeeze(1)
    return loss, dh, dW, db


class _HiddenMSEFunction(torch.autograd.Function):
    """Forward runs the fused chunks and keeps only the gradients (never Y); backward scales them.

    Inputs are one layer (``hs`` [N, d_s], ``weight`` [d_t, d_s]) or n layers (``hs`` [n, N, d_s],
    ``weight`` [n, d_t, d_s], ``w`` [n, N]); the gradients come back in the inputs' shapes."""

    @staticmethod
    def forward(ctx, hs, ht, weight, bias, w, epilogue, chunk_rows, grad_enabled, masked):
        need = tuple(grad_enabled and bool(ctx.needs_input_grad[i]) for i in (0, 2, 3))
        layered = hs.dim() == 3
        as_layers = (lambda x: x) if layered else (lambda x: x.unsqueeze(0) if x is not None else None)
        # the GEMMs accumulate in fp32 whatever autocast region the loss is called from
        with torch.autocast(hs.device.type, enabled=False):
            loss, dh, dW, db = hidden_mse_fwd_bwd(as_layers(hs), as_layers(ht), as_layers(weight), as_layers(bias),
                                                  as_layers(w), epilogue, need, chunk_rows, masked)
        dh, dW, db = (g.view(x.shape) if g is not None else None for g, x in ((dh, hs), (dW, weight), (db, bias)))
        ctx.has = (dh is not None, dW is not None, db is not None)
        ctx.save_for_backward(*(g for g in (dh, dW, db) if g is not None))
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if h else None for h in ctx.has]
        grads = [scale_stored_grad(g, grad_out) if g is not None else None for g in grads]
        dh, dW, db = grads
        need = ctx.needs_input_grad
        return (dh if need[0] else None, None, dW if need[2] else None, db if need[3] else None,
                None, None, None, None, None)


def hidden_mse_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    proj_weight: Tensor | None = None,
    proj_bias: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    r"""TinyBERT hidden-state (and embedding) loss: MSE through a learned projection.

    With h_s [..., d_s], h_t [..., d_t], W_p [d_t, d_s], b_p [d_t] and the counted tokens
    C = {r : mask_r != 0} (every token when ``mask`` is None), n = |C| d_t:

        Y_r  = h_s,r W_p^T + b_p              (Y = h_s when ``proj_weight`` is None: d_s = d_t)
        loss = (1 / n) sum_{r in C} sum_j (Y_rj - h_t,rj)^2                (0 when C is empty)

    Gradients (teacher frozen), with dY = 2 (Y - h_t) / n on counted rows, 0 elsewhere:
    dh_s = dY W_p, dW_p = dY^T h_s, db_p = sum_r dY_r (accumulated in fp32).

    Several layers in one call: with ``proj_weight`` [n_layers, d_t, d_s] (and ``proj_bias``
    [n_layers, d_t]) the states are [n_layers, ..., d_s] / [n_layers, ..., d_t], layer l is
    projected by its own W_p[l], b_p[l], ``mask`` has the leading shape of one layer (shared by
    all), and the result is the sum of the per-layer losses above, sum_l loss_l (TinyBERT sums
    its layer terms); each chunk runs one batched GEMM for all layers.

    Fused: Y is computed chunk by chunk (rows) with the library GEMM, an epilogue (Triton or C++
    row kernel, or eager torch) turns each chunk into its loss rows and dY in place, and dY is at once
    folded into the three gradients. Only one chunk of Y (about 2^20 fp32 values) ever exists;
    nothing of size [N, d_t] is stored for backward.

    Args:
        student_hidden: [..., d_s] float tensor; gradient flows to it.
        teacher_hidden: [..., d_t], same leading shape, dtype and device; no gradient.
        proj_weight: optional [d_t, d_s] projection (``nn.Linear(d_s, d_t).weight``), or
            [n_layers, d_t, d_s] (the states then carry a leading layer dimension); required
            when d_s != d_t. Same device, any float dtype (its gradient comes back in it), e.g.
            fp32 master weights with bf16 states; the GEMMs run in fp32 (float64 for float64
            states) even inside an autocast region.
        proj_bias: optional [d_t] (or [n_layers, d_t]) bias (only with ``proj_weight``).
        mask: optional token mask with the states' leading shape, without the layer dimension
            (nonzero = counted).
        backend: ``auto`` (Triton epilogue on CUDA tensors when it works, the C++ epilogue on
            CPU tensors when ``kdfast._C`` is built, else torch), ``triton``, ``cpu`` or
            ``torch``; ``cuda`` raises. float64 input with ``triton`` runs the torch epilogue
            (the Triton one computes in fp32); the C++ one computes in float64.

    Returns:
        Scalar loss, float32 (float64 for float64 input).

    Raises:
        ValueError naming the argument: shapes, width mismatch without a projection, dtype,
        device, mask shape, backend; where the value checks run, NaN / Inf in a counted row of
        either side (looked for when the loss is not finite).
    """
    _check_states(student_hidden, teacher_hidden, same_width=False)
    d_s, d_t = student_hidden.shape[-1], teacher_hidden.shape[-1]
    dev = student_hidden.device
    layered = isinstance(proj_weight, Tensor) and proj_weight.dim() == 3
    n_layers = proj_weight.shape[0] if layered else None
    if proj_weight is None:
        if proj_bias is not None:
            raise ValueError("proj_bias needs proj_weight (a bias without a projection is not supported)")
        if d_s != d_t:
            raise ValueError(f"proj_weight is required: student_hidden has width {d_s} but teacher_hidden {d_t} "
                             f"(pass a [{d_t}, {d_s}] projection, e.g. HiddenMSELoss({d_s}, {d_t}))")
    else:
        check_tensor("proj_weight", proj_weight, min_dim=2)
        expected = (n_layers, d_t, d_s) if layered else (d_t, d_s)
        if tuple(proj_weight.shape) != expected:
            raise ValueError(f"proj_weight has shape {tuple(proj_weight.shape)}, expected [d_t, d_s] = {(d_t, d_s)} "
                             f"or [n_layers, d_t, d_s]")
        if proj_weight.device != dev:
            raise ValueError(f"proj_weight is on {proj_weight.device} but student_hidden is on {dev}")
        if proj_bias is not None:
            check_tensor("proj_bias", proj_bias, min_dim=1)
            if tuple(proj_bias.shape) != expected[:-1]:
                raise ValueError(f"proj_bias has shape {tuple(proj_bias.shape)}, expected {list(expected[:-1])}")
            if proj_bias.device != dev:
                raise ValueError(f"proj_bias is on {proj_bias.device} but student_hidden is on {dev}")
    if layered and (student_hidden.dim() < 2 or student_hidden.shape[0] != n_layers):
        raise ValueError(f"student_hidden has shape {tuple(student_hidden.shape)}: with proj_weight "
                         f"[n_layers={n_layers}, d_t, d_s] it must be [n_layers, ..., d_s]")
    acc = acc_dtype(student_hidden.dtype)
    lead = student_hidden.shape[1:-1] if layered else student_hidden.shape[:-1]
    w = mask_row_weights(mask, lead, dev, acc, per_row=d_t)
    epilogue = registry.select("hidden_mse_epilogue", backend, student_hidden, what="hidden_mse_loss").fn
    if layered:  # every layer counts the same tokens, normalised on its own
        chunk_rows = max(16, CHUNK_ELEMS // (n_layers * d_t))
        loss = _HiddenMSEFunction.apply(student_hidden.reshape(n_layers, -1, d_s).contiguous(),
                                        teacher_hidden.detach().reshape(n_layers, -1, d_t).contiguous(),
                                        proj_weight, proj_bias, w.expand(n_layers, -1), epilogue, chunk_rows,
                                        torch.is_grad_enabled(), mask is not None)
    else:
        chunk_rows = max(16, CHUNK_ELEMS // d_t)
        loss = _HiddenMSEFunction.apply(_rows(student_hidden), _rows(teacher_hidden.detach()), proj_weight, proj_bias,
                                        w, epilogue, chunk_rows, torch.is_grad_enabled(), mask is not None)
    explain_non_finite(loss, _counted_inputs(w, [("teacher_hidden", teacher_hidden.detach()),
                                                 ("student_hidden", student_hidden.detach()),
                                                 ("proj_weight", None if proj_weight is None else proj_weight.detach()),
                                                 ("proj_bias", None if proj_bias is None else proj_bias.detach())]))
    return loss


class HiddenMSELoss(nn.Module):
    """:func:`hidden_mse_loss` with its own projection ``nn.Linear(d_s, d_t)`` (standard init).

    With ``d_s == d_t`` and ``project=False`` no projection is created (plain MSE).
    ``forward(student_hidden, teacher_hidden, mask=None)`` returns the loss.
    """

    def __init__(self, d_s: int, d_t: int, *, bias: bool = True, project: bool | None = None,
                 backend: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        for name, v in (("d_s", d_s), ("d_t", d_t)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if project is None:
            project = d_s != d_t
        if not project and d_s != d_t:
            raise ValueError(f"project=False needs d_s == d_t, got d_s={d_s}, d_t={d_t}")
        self.d_s, self.d_t, self.backend = d_s, d_t, backend
        self.proj = nn.Linear(d_s, d_t, bias=bias, device=device, dtype=dtype) if project else None

    def forward(self, student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None) -> Tensor:
        weight = self.proj.weight if self.proj is not None else None
        bias = self.proj.bias if self.proj is not None else None
        return hidden_mse_loss(student_hidden, teacher_hidden, weight, bias, mask, backend=self.backend)

    def extra_repr(self) -> str:
        return f"d_s={self.d_s}, d_t={self.d_t}, backend={self.backend!r}"


# --- DistilBERT cosine loss ----------------------------------------------------------------------

class _CosineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, w, eps, kernel, grad_enabled):
        need_grad = grad_enabled and bool(ctx.needs_input_grad[0])
        rows, g = kernel(s, t, w, eps, need_grad)
        ctx.save_for_backward(g)
        return rows.to(w.dtype).sum()

    @staticmethod
    def backward(ctx, grad_out):
        (g,) = ctx.saved_tensors
        g = scale_stored_grad(g, grad_out)
        return g if ctx.needs_input_grad[0] else None, None, None, None, None, None


def cosine_loss(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None, *,
                eps: float = 1e-8, backend: str = "auto") -> Tensor:
    r"""DistilBERT cosine loss: mean over counted tokens of 1 - cos(h_s, h_t).

    With C the counted tokens (``mask != 0``; all when ``mask`` is None):

        cos_r = h_s,r . h_t,r / (max(|h_s,r|, eps) max(|h_t,r|, eps))
        loss  = (1 / |C|) sum_{r in C} (1 - cos_r)                       (0 when C is empty)
        d loss / d h_s,r = -(1 / |C|) (h_t,r / (|h_s,r| |h_t,r|) - cos_r h_s,r / |h_s,r|^2)

    (the second term drops where |h_s,r| <= eps). Equals DistilBERT's
    ``CosineEmbeddingLoss(target=1)`` on the selected tokens. Fused: one pass over the rows
    computes the loss and the gradient (Triton row kernel for widths up to 8192, C++ row kernel
    on CPU tensors, or eager torch); backward only scales the stored gradient.

    Args:
        student_hidden, teacher_hidden: [..., d], same shape, dtype and device (equal widths).
        mask: optional token mask with the states' leading shape.
        eps: lower bound of the norms.
        backend: ``auto`` / ``triton`` / ``cpu`` / ``torch`` (``cuda`` raises). With ``triton``,
            float64 input and rows wider than 8192 run the torch version.

    Returns:
        Scalar loss, float32 (float64 for float64 input); gradient to ``student_hidden`` only.

    Raises:
        ValueError naming the argument: shapes, width mismatch, dtype, device, mask shape, backend;
        where the value checks run, NaN / Inf in a counted row of either side.
    """
    _check_states(student_hidden, teacher_hidden, same_width=True)
    eps = check_positive("eps", eps)
    dev = student_hidden.device
    acc = acc_dtype(student_hidden.dtype)
    w = mask_row_weights(mask, student_hidden.shape[:-1], dev, acc)
    kernel = registry.select("cosine_rows", backend, student_hidden, what="cosine_loss").fn
    loss = _CosineFunction.apply(_rows(student_hidden), _rows(teacher_hidden.detach()), w, eps, kernel,
                                 torch.is_grad_enabled())
    explain_non_finite(loss, _counted_inputs(w, [("teacher_hidden", teacher_hidden.detach()),
                                                 ("student_hidden", student_hidden.detach())]))
    return loss


# --- MobileBERT feature-map transfer -------------------------------------------------------------

def feature_map_loss(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None, *,
                     eps: float = 1e-5, beta_mean: float = 1.0, beta_var: float = 1.0,
                     backend: str = "auto") -> Tensor:
    r"""MobileBERT feature-map transfer (FMT) between layer outputs of equal width.

    The MobileBERT paper (Sun et al., 2020, sec. 3.5) defines FMT as the MSE between the
    teacher's and the student's feature maps, and reports that splitting it into a normalised
    feature-map discrepancy plus a feature-map statistics discrepancy stabilises training.
    This computes exactly that split. Per token r, over the d hidden units:

        mu_r = mean_j h_rj,  var_r = mean_j (h_rj - mu_r)^2  (biased),
        n_rj = (h_rj - mu_r) / sqrt(var_r + eps)             (parameter-free layer norm)

    and with C the counted tokens (``mask != 0``):

        loss = 1/(|C| d) sum_{r in C, j} (n^s_rj - n^t_rj)^2              (normalised maps)
             + beta_mean / |C| sum_{r in C} (mu^s_r - mu^t_r)^2           (means)
             + beta_var  / |C| sum_{r in C} |var^s_r - var^t_r|           (variances)

    ``beta_mean = beta_var = 0`` leaves the pure MSE of the layer-normalised maps. Eager torch,
    differentiated by autograd (gradient to ``student_hidden`` only); computed in fp32 (fp64
    for fp64 input). Padded rows are zeroed before use, so they may hold anything finite.

    Args:
        student_hidden, teacher_hidden: [..., d], same shape, dtype and device.
        mask: optional token mask with the states' leading shape.
        eps: layer-norm epsilon (> 0).
        beta_mean, beta_var: weights of the statistics terms (>= 0).
        backend: ``auto`` or ``torch`` (no kernel for this loss; others raise).

    Raises:
        ValueError naming the argument: shapes, width mismatch, dtype, device, mask shape, eps,
        beta_mean / beta_var, backend.
    """
    _check_states(student_hidden, teacher_hidden, same_width=True)
    dev = student_hidden.device
    acc = acc_dtype(student_hidden.dtype)
    feature_map = registry.select("feature_map", backend, student_hidden, what="feature_map_loss").fn
    eps = check_positive("eps", eps)
    beta_mean, beta_var = check_nonnegative("beta_mean", beta_mean), check_nonnegative("beta_var", beta_var)
    d = student_hidden.shape[-1]
    w = mask_row_weights(mask, student_hidden.shape[:-1], dev, acc)   # 1 / |C| on counted rows
    loss = feature_map(student_hidden.reshape(-1, d), teacher_hidden.detach().reshape(-1, d), w, eps, beta_mean,
                       beta_var)
    explain_non_finite(loss, _counted_inputs(w, [("teacher_hidden", teacher_hidden.detach()),
                                                 ("student_hidden", student_hidden.detach())]))
    return loss
