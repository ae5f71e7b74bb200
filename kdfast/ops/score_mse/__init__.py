r"""Kernel family score_mse: TinyBERT's attention MSE on materialised [B, H, L, L] score maps.

For row r = (b, h, i) of the student / teacher score maps s, t (teacher heads already mapped onto
the student's, :func:`kdfast.losses.map_teacher_heads`), with a [B, L] int8 token mask m (used
when ``has_mask``), the additive-mask threshold theta and a window w (an int; -1: none), element
j is *counted* when

    s_j > theta  and  t_j > theta  and  (not has_mask  or  m[b, i] != 0 and m[b, j] != 0)
                 and  (w = -1  or  |i - j| <= w)

With a window only the band of each row is read (the ``cpu`` and ``triton`` kernels start and end
their row loops at the band: a local layer costs O(B H L w) reads); the gradient is 0 elsewhere.

Two ops, the row kernels of :func:`kdfast.attention_mse_loss`:

- ``score_mse_fwd(s, t, mask, threshold, has_mask, window) -> (sums, counts)``: per row, the sum of counted
  (s_j - t_j)^2 ([B*H*L], float32; float64 for float64 maps on torch / cpu) and the number of
  counted elements ([B*H*L] int32). The loss is sum(sums) / max(1, sum(counts)) (counts summed in
  int64: B H L^2 may exceed fp32's exact integers).
- ``score_mse_bwd(s, t, mask, coef, threshold, has_mask, window) -> grad``: d loss / d s_j = 2 coef (s_j - t_j)
  on counted elements, 0 elsewhere, [B, H, L, L] contiguous in s's dtype; ``coef`` a one-element
  tensor in the accumulation dtype (upstream gradient / total count), read on the device, so
  nothing synchronises with the host.

Nothing but the inputs is kept between the two: the gradient is recomputed, since its scale (the
total count) is known only once every row has been read. Rows of masked query tokens are never
read (they may hold anything). Backends: ``torch`` (:mod:`.eager`), ``triton`` (:mod:`.triton`, one
program per row; custom ops ``kdfast::score_mse_{fwd,bwd}_triton`` below), ``cpu``
(``torch.ops.kdfast.score_mse_{fwd,bwd}``, csrc/ops/score_mse/cpu.cpp: at::vec within a row,
at::parallel_for over rows; fp16 / bf16 widened to fp32). No CUDA C++ kernel.

Importing this package registers the implementations; it never imports triton.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast import backend as _backend
from kdfast.ops.dtypes import acc_dtype
from kdfast.ops.registry import register
from kdfast.ops.score_mse.eager import score_mse_bwd_torch, score_mse_fwd_torch

FWD_OP = "score_mse_fwd"
BWD_OP = "score_mse_bwd"
_TRITON_CONFIGS = "kdfast.ops.score_mse.triton:AOT_CONFIGS"


@torch.library.custom_op("kdfast::score_mse_fwd_triton", mutates_args=())
def score_mse_fwd_triton(s: Tensor, t: Tensor, mask: Tensor, threshold: float, has_mask: bool,
                         window: int) -> tuple[Tensor, Tensor]:
    """``score_mse_fwd`` on the Triton kernel (row sums in float32)."""
    from kdfast.ops.score_mse.triton import score_mse_fwd_triton as launch

    return launch(s, t, mask, threshold, has_mask, window)


@score_mse_fwd_triton.register_fake
def _(s, t, mask, threshold, has_mask, window):
    n = s.shape[0] * s.shape[1] * s.shape[2]
    return s.new_empty(n, dtype=torch.float32), s.new_empty(n, dtype=torch.int32)


@torch.library.custom_op("kdfast::score_mse_bwd_triton", mutates_args=())
def _score_mse_bwd_triton_op(s: Tensor, t: Tensor, mask: Tensor, coef: Tensor, threshold: float,
                             has_mask: bool, window: int) -> Tensor:
    from kdfast.ops.score_mse.triton import score_mse_bwd_triton as launch

    return launch(s, t, mask, coef, threshold, has_mask, window)


@_score_mse_bwd_triton_op.register_fake
def _(s, t, mask, coef, threshold, has_mask, window):
    return torch.empty_like(s, memory_format=torch.contiguous_format)


def score_mse_bwd_triton(s: Tensor, t: Tensor, mask: Tensor, coef: Tensor, threshold: float,
                         has_mask: bool, window: int) -> Tensor:
    """``score_mse_bwd`` on the Triton kernel, which reads an fp32 ``coef``."""
    return _score_mse_bwd_triton_op(s, t, mask, coef.to(torch.float32), threshold, has_mask, window)


register(FWD_OP, "torch", score_mse_fwd_torch)
register(BWD_OP, "torch", score_mse_bwd_torch)
register(FWD_OP, "triton", score_mse_fwd_triton, aot_configs=_TRITON_CONFIGS)
register(BWD_OP, "triton", score_mse_bwd_triton)

# An extension built before the window argument existed: its cpu backend is left out until a rebuild.
if _backend._extension()[0] is not None and any(
        a.name == "window" for a in getattr(torch.ops.kdfast, "score_mse_fwd").default._schema.arguments):

    @torch.library.register_fake("kdfast::score_mse_fwd")
    def _(s, t, mask, threshold, has_mask, window):
        n = s.shape[0] * s.shape[1] * s.shape[2]
        return s.new_empty(n, dtype=acc_dtype(s.dtype)), s.new_empty(n, dtype=torch.int32)

    @torch.library.register_fake("kdfast::score_mse_bwd")
    def _(s, t, mask, coef, threshold, has_mask, window):
        return torch.empty_like(s, memory_format=torch.contiguous_format)

    register(FWD_OP, "cpu", torch.ops.kdfast.score_mse_fwd)
    register(BWD_OP, "cpu", torch.ops.kdfast.score_mse_bwd)
