"""Fused MobileBERT kernels: bias + residual + NoNorm, and the stacked FFN chain.

:func:`enable_fused_kernels` routes :mod:`kdfast.models.mobilebert`'s blocks to them on one backend
(:func:`kdfast.models.mobilebert.set_kernel_backend`); :func:`disable_fused_kernels` restores the eager
functions.

* :func:`fused_bias_residual_nonorm`: ``y = (x + bias + residual) * gamma + beta`` as one kernel
  forward and one kernel backward (``dx = dresidual = dy * gamma``, ``dbias = sum dy * gamma``,
  ``dgamma = sum dy * (x + bias + residual)``, ``dbeta = sum dy``, all from one pass over ``dy``
  and the saved ``x`` and ``residual``; the sum is recomputed, never stored).
* :func:`fused_stacked_ffn`: the chain of residual FFNs of a block,
  ``x <- NoNorm(relu(x W_in^T + b_in) W_out^T + b_out + x)``, as one autograd node whose
  backward runs only GEMMs and fused passes: the epilogue backward above, ReLU backward fused
  with ``b_in``'s gradient, and the residual gradient accumulated by the GEMM itself
  (``dx = addmm(dresidual, dh, W_in)``), so no separate gradient additions.
* :func:`fused_attention_inputs`: the block's input bottleneck, shared key/query bottleneck and
  value projection (all read the block input) as one GEMM, query and key as another, both
  bottleneck NoNorms in one pass; backward needs two GEMMs per group and no gradient additions.

Where the time goes (CPU, batch 8, seq 128, fwd+bwd): about 80% of transformers' step is GEMM,
and single-thread MKL already runs these shapes at the machine's peak, so fusing the
memory-bound remainder bounds the possible speed-up near 1.2x (see ``kdfast/bench/models.py``).

The kernels are the ops of :mod:`kdfast.ops.mobilebert_blocks` (their contract, and where each backend
lives), and :mod:`kdfast.ops.registry` picks the backend: ``cpu`` (the vectorised C++ ops; float32/float64),
``triton`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``; not float64) and ``torch`` (eager
formulas, any dtype). ``auto`` picks the C++ ops for float32/float64 CPU tensors, Triton on CUDA, eager
otherwise.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfast.models import mobilebert as _mb
from kdfast.ops import mobilebert_blocks as _blocks  # noqa: F401  (registers the family's ops)
from kdfast.ops import registry

__all__ = [
    "disable_fused_kernels",
    "fused_attention_inputs",
    "enable_fused_kernels",
    "fused_bias_residual_nonorm",
    "fused_stacked_ffn",
]


# --- the three ops of kdfast.ops.mobilebert_blocks, on one backend -----------------------------

class _Ops(NamedTuple):
    nonorm_fwd: Callable
    nonorm_bwd: Callable
    relu_bwd_colsum: Callable


def _ops(backend: str, x: Tensor, what: str) -> _Ops:
    """The registry's implementations of the three ops for tensors like ``x`` (``what``: the public name
    named by the errors of an explicit ``backend`` that cannot run them)."""
    return _Ops(*(registry.select(op, backend, x, what=what).fn for op in _Ops._fields))


def _rows(t: Tensor, d: int) -> Tensor:
    t2 = t.reshape(-1, d)
    return t2 if d <= 1 or t2.stride(1) == 1 else t2.contiguous()


# --- bias + residual + NoNorm -----------------------------------------------------------------

class _BiasResidualNoNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, residual, gamma, beta, ops):
        d = x.shape[-1]
        x2, r2 = _rows(x, d), (None if residual is None else _rows(residual, d))
        y = ops.nonorm_fwd(x2, bias, r2, gamma, beta)
        ctx.save_for_backward(x2, bias, r2, gamma)
        ctx.ops, ctx.shape = ops, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, bias, r2, gamma = ctx.saved_tensors
        dx, db, dgamma, dbeta = ctx.ops.nonorm_bwd(_rows(dy, x2.shape[1]), x2, bias, r2, gamma)
        dx = dx.view(ctx.shape)
        return (dx, db if bias is not None else None, dx if r2 is not None else None, dgamma, dbeta, None)


def _check_epilogue_args(x, bias, residual, gamma, beta) -> None:
    if not isinstance(x, Tensor) or x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor with at least 1 dimension, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    d = x.shape[-1]
    for name, t in (("gamma", gamma), ("beta", beta), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, Tensor) or t.shape != (d,):
            raise ValueError(f"{name} must be a tensor of shape ({d},), got {getattr(t, 'shape', type(t).__name__)}")
    if residual is not None and (not isinstance(residual, Tensor) or residual.shape != x.shape):
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got "
                         f"{getattr(residual, 'shape', type(residual).__name__)}")
    for name, t in (("bias", bias), ("residual", residual), ("gamma", gamma), ("beta", beta)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name} must match x's dtype {x.dtype} and device {x.device}, got {t.dtype} on {t.device}")


def fused_bias_residual_nonorm(x: Tensor, bias: Tensor | None, residual: Tensor | None, gamma: Tensor,
                               beta: Tensor, *, backend: str = "auto") -> Tensor:
    r"""MobileBERT's epilogue ``y = (x + bias + residual) * gamma + beta`` in one fused kernel.

    Backward, one pass over ``dy``, ``x`` and ``residual`` (sums over all leading dimensions):
    ``dx = dresidual = dy * gamma``, ``dbias = sum(dy * gamma) = gamma * sum(dy)``,
    ``dgamma = sum(dy * (x + bias + residual))``, ``dbeta = sum(dy)``.

    Args:
        x: ``[..., D]`` (typically a bias-free GEMM output).
        bias: ``[D]`` or ``None`` (already added).
        residual: same shape as ``x``, or ``None`` (plain ``NoNorm(x + bias)``).
        gamma, beta: ``[D]`` NoNorm scale and shift.
        backend: ``auto`` / ``cpu`` / ``triton`` / ``torch`` (see the module docstring).

    Returns:
        ``y``, shaped like ``x``.

    Raises:
        ValueError naming the argument: wrong shape, dtype or device; a backend that cannot run here.
    """
    _check_epilogue_args(x, bias, residual, gamma, beta)
    return _BiasResidualNoNorm.apply(x, bias, residual, gamma, beta,
                                     _ops(backend, x, "fused_bias_residual_nonorm"))


# --- the stacked FFN chain --------------------------------------------------------------------

_PER_FFN = 6  # w_in, b_in, w_out, b_out, gamma, beta


class _StackedFFN(torch.autograd.Function):
    """``x <- NoNorm(relu(x W_in^T + b_in) W_out^T + b_out + x)`` for each FFN, on 2-D rows."""

    @staticmethod
    def forward(ctx, x, ops, *params):
        saved = []
        cur = x
        for i in range(0, len(params), _PER_FFN):
            w_in, b_in, w_out, b_out, gamma, beta = params[i:i + _PER_FFN]
            h = torch.addmm(b_in, cur, w_in.t()).relu_()
            y = torch.mm(h, w_out.t())
            nxt = ops.nonorm_fwd(y, b_out, cur, gamma, beta)
            saved += [cur, h, y]
            cur = nxt
        ctx.save_for_backward(*saved, *params)
        ctx.ops, ctx.n = ops, len(params) // _PER_FFN
        return cur

    @staticmethod
    def backward(ctx, dout):
        ops = ctx.ops
        tensors = ctx.saved_tensors
        acts, params = tensors[:3 * ctx.n], tensors[3 * ctx.n:]
        grads = [None] * len(params)
        g = dout.contiguous()
        for k in reversed(range(ctx.n)):
            cur, h, y = acts[3 * k:3 * k + 3]
            w_in, b_in, w_out, b_out, gamma, _ = params[_PER_FFN * k:_PER_FFN * (k + 1)]
            dy, db_out, dgamma, dbeta = ops.nonorm_bwd(g, y, b_out, cur, gamma)  # dy is also d residual
            dw_out = torch.mm(dy.t(), h)
            dh = torch.mm(dy, w_out)
            db_in = ops.relu_bwd_colsum(dh, h)
            dw_in = torch.mm(dh.t(), cur)
            g = torch.addmm(dy, dh, w_in)  # d cur = dh W_in + d residual, accumulated by the GEMM
            grads[_PER_FFN * k:_PER_FFN * (k + 1)] = [dw_in, db_in, dw_out, db_out, dgamma, dbeta]
        return (g, None, *grads)


def _is_relu(activation) -> bool:
    return isinstance(activation, nn.ReLU) or activation in (F.relu, torch.relu)


def fused_stacked_ffn(x: Tensor, ffns: Sequence[_mb.FFNParams], activation: Callable, normalization_type: str,
                      dropout_last: float = 0.0, training: bool = False, *, backend: str = "auto") -> Tensor:
    r"""The chain of residual FFNs of a MobileBERT block as one autograd node: for each ``p`` in ``ffns``

        ``x <- (relu(x W_in^T + b_in) W_out^T + b_out + x) * gamma + beta``

    with the epilogue fused (forward and backward), ReLU backward fused with ``b_in``'s gradient and the
    residual gradient accumulated by the GEMM (``dx = addmm(dresidual, dh, W_in)``). Same signature as
    :func:`kdfast.models.mobilebert.stacked_ffn`; configurations it does not cover (LayerNorm, another
    activation, dropout on the last FFN in training) run that eager function instead.

    Raises:
        ValueError naming the argument: ``x`` not a floating tensor of at least 1 dimension, ``ffns``
        empty or with shapes that do not chain, unknown ``backend``.
    """
    if not isinstance(x, Tensor) or x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor with at least 1 dimension, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if len(ffns) == 0:
        raise ValueError("ffns must hold at least one FFNParams")
    d = x.shape[-1]
    for i, p in enumerate(ffns):
        if p.w_in.shape[1] != d or p.w_out.shape != (d, p.w_in.shape[0]) or p.gamma.shape != (d,):
            raise ValueError(f"ffns[{i}] does not map width {d} to {d}: w_in {tuple(p.w_in.shape)}, "
                             f"w_out {tuple(p.w_out.shape)}, gamma {tuple(p.gamma.shape)}")
    ops = _ops(backend, x, "fused_stacked_ffn")
    if (normalization_type != "no_norm" or not _is_relu(activation) or (dropout_last > 0.0 and training)
            or any(p.b_in is None or p.b_out is None or p.w_in.dtype != x.dtype for p in ffns)):
        return _mb.stacked_ffn(x, ffns, activation, normalization_type, dropout_last, training)
    params = [t for p in ffns for t in (p.w_in, p.b_in, p.w_out, p.b_out, p.gamma, p.beta)]
    out = _StackedFFN.apply(x.reshape(-1, d).contiguous(), ops, *params)
    return out.view(x.shape)


# --- attention inputs: grouped GEMMs over the block input ------------------------------------------

class _AttentionInputs(torch.autograd.Function):
    """MobileBERT's ``key_query_shared_bottleneck`` block inputs from ``hidden`` [N, H] as two GEMMs:

    ``Y1 = hidden [W_bi; W_ba; W_v]^T + [b_bi; b_ba; b_v]``, ``A = NoNorm(Y1[:, :2t])`` (both bottlenecks at
    once), ``Y2 = A[:, t:] [W_q; W_k]^T + [b_q; b_k]``; outputs ``layer_input = A[:, :t]``, ``q, k = Y2``
    halves, ``v = Y1[:, 2t:]``. Backward: two GEMMs per group (instead of two per projection) and no
    gradient additions for ``hidden`` or the shared bottleneck."""

    @staticmethod
    def forward(ctx, hidden, ops, w_bi, b_bi, g_bi, be_bi, w_ba, b_ba, g_ba, be_ba, w_v, b_v, w_q, b_q, w_k,
                b_k):
        t = w_bi.shape[0]
        w1 = torch.cat([w_bi, w_ba, w_v])
        y1 = torch.addmm(torch.cat([b_bi, b_ba, b_v]), hidden, w1.t())
        gamma = torch.cat([g_bi, g_ba])
        a = ops.nonorm_fwd(y1[:, :2 * t], None, None, gamma, torch.cat([be_bi, be_ba]))
        w2 = torch.cat([w_q, w_k])
        y2 = torch.addmm(torch.cat([b_q, b_k]), a[:, t:], w2.t())
        ctx.save_for_backward(hidden, y1, a, w1, w2, gamma)
        ctx.ops, ctx.t, ctx.tq = ops, t, w_q.shape[0]
        return a[:, :t], y2[:, :ctx.tq], y2[:, ctx.tq:], y1[:, 2 * t:]

    @staticmethod
    def backward(ctx, d_li, d_q, d_k, d_v):
        hidden, y1, a, w1, w2, gamma = ctx.saved_tensors
        t, tq = ctx.t, ctx.tq
        n = hidden.shape[0]
        zeros = lambda w: hidden.new_zeros(n, w)  # noqa: E731  (an output that got no gradient)
        d_y2 = torch.cat([zeros(tq) if d_q is None else d_q, zeros(tq) if d_k is None else d_k], dim=1)
        d_w2 = torch.mm(d_y2.t(), a[:, t:])
        d_b2 = d_y2.sum(0)
        d_a = torch.cat([zeros(t) if d_li is None else d_li, torch.mm(d_y2, w2)], dim=1)
        d_s, d_bs, d_gamma, d_beta = ctx.ops.nonorm_bwd(d_a, y1[:, :2 * t], None, None, gamma)
        d_v = zeros(y1.shape[1] - 2 * t) if d_v is None else d_v
        d_y1 = torch.cat([d_s, d_v], dim=1)
        d_w1 = torch.mm(d_y1.t(), hidden)
        d_hidden = torch.mm(d_y1, w1)
        d_bv = d_v.sum(0)
        return (d_hidden, None,
                d_w1[:t], d_bs[:t], d_gamma[:t], d_beta[:t],
                d_w1[t:2 * t], d_bs[t:], d_gamma[t:], d_beta[t:],
                d_w1[2 * t:], d_bv,
                d_w2[:tq], d_b2[:tq], d_w2[tq:], d_b2[tq:])


def fused_attention_inputs(layer: nn.Module, hidden: Tensor, *, backend: str = "auto"):
    r"""A MobileBERT block's attention inputs ``(layer_input, q, k, v)`` (see
    :func:`kdfast.models.mobilebert.attention_inputs`) with the GEMMs that share an input grouped:

        ``[bi | ba | v] = hidden [W_bi; W_ba; W_v]^T + [b_bi; b_ba; b_v]``,
        ``layer_input = NoNorm(bi)``, ``qk_in = NoNorm(ba)`` (one fused pass for both),
        ``[q | k] = qk_in [W_q; W_k]^T + [b_q; b_k]``.

    Applies to the ``key_query_shared_bottleneck`` NoNorm configuration (MobileBERT's default); other
    configurations run the eager function. Outputs are column slices of the grouped GEMM outputs.

    Raises:
        ValueError naming the argument: ``hidden`` not ``[B, L, hidden_size]`` of the layer's dtype and device.
    """
    if not isinstance(hidden, Tensor) or hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating-point [B, L, hidden_size] tensor, got "
                         f"{getattr(hidden, 'shape', type(hidden).__name__)}")
    if not (layer.use_bottleneck and layer.key_query_shared_bottleneck and not layer.use_bottleneck_attention
            and layer.normalization_type == "no_norm"):
        return _mb.attention_inputs(layer, hidden)
    sa = layer.attention.self
    w_v = sa.value.weight
    if hidden.shape[-1] != w_v.shape[1] or hidden.dtype != w_v.dtype or hidden.device != w_v.device:
        raise ValueError(f"hidden must be [B, L, {w_v.shape[1]}] of dtype {w_v.dtype} on {w_v.device}, got "
                         f"{tuple(hidden.shape)} of dtype {hidden.dtype} on {hidden.device}")
    ops = _ops(backend, hidden, "fused_attention_inputs")
    bi, ba = layer.bottleneck.input, layer.bottleneck.attention
    b, l, h = hidden.shape
    outs = _AttentionInputs.apply(
        hidden.reshape(b * l, h).contiguous(), ops,
        bi.dense.weight, bi.dense.bias, bi.LayerNorm.weight, bi.LayerNorm.bias,
        ba.dense.weight, ba.dense.bias, ba.LayerNorm.weight, ba.LayerNorm.bias,
        w_v, sa.value.bias, sa.query.weight, sa.query.bias, sa.key.weight, sa.key.bias)
    return tuple(o.view(b, l, o.shape[1]) for o in outs)


# --- switching ----------------------------------------------------------------------------------

def enable_fused_kernels(backend: str = "auto") -> None:
    """Route MobileBERT's ``attention_inputs``, bias + residual + NoNorm epilogues and ``stacked_ffn`` to the
    fused kernels of ``backend`` (``auto`` picks per tensor at call time):
    ``kdfast.models.mobilebert.set_kernel_backend(backend)``. Raises ValueError for an unknown backend."""
    _mb.set_kernel_backend(backend)


def disable_fused_kernels() -> None:
    """Restore the eager ``attention_inputs``, ``bias_residual_nonorm`` and ``stacked_ffn``."""
    _mb.set_kernel_backend(None)


# looked up at call time, as an import of this module would be
_mb.install_fused_functions(lambda *args, **kwargs: fused_attention_inputs(*args, **kwargs),
                            lambda *args, **kwargs: fused_stacked_ffn(*args, **kwargs),
                            lambda *args, **kwargs: fused_bias_residual_nonorm(*args, **kwargs))
