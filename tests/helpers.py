"""Shared test helpers: tolerances by dtype, one ``assert_close``, padding masks."""

from __future__ import annotations

import torch

F64 = {torch.float64: (1e-10, 1e-12)}
# (rtol, atol) by input dtype, for maps and hidden states ...
TOL = {torch.float32: (2e-5, 2e-6), torch.float16: (2e-3, 2e-3), torch.bfloat16: (8e-3, 4e-3), **F64}
# ... and for logit rows, whose bf16 rounding spreads over a whole vocabulary row
TOL_LOGITS = {torch.float32: (2e-5, 2e-6), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2), **F64}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                 tol: dict = TOL) -> None:
    """``actual`` equals the float64 ``expected`` within ``tol[dtype]``; atol scales with max |expected|
    (gradient entries are O(1/N))."""
    rtol, atol = tol[dtype]
    atol = atol * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def make_mask(B: int, L: int, *, full_row: bool = False) -> torch.Tensor:
    """A [B, L] padding mask: random lengths (>= 1), the first sequence full, optionally the last one
    fully padded."""
    lengths = torch.randint(1, L + 1, (B,))
    lengths[0] = L
    mask = torch.arange(L)[None, :] < lengths[:, None]
    if full_row and B > 2:
        mask[-1] = False
    return mask


def backends_of(op: str) -> list[str]:
    """The registered backends of ``op`` that run on CPU tensors in this test process: a family's
    tests run over these, so a backend is tested the day it is registered."""
    from kdfast.ops import registry
    from tests.conftest import CPU_BACKENDS

    return [b for b in CPU_BACKENDS if b in registry.impls(op)]


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """:func:`assert_close` at the logit-row tolerances (:data:`TOL_LOGITS`)."""
    assert_close(actual, expected, dtype, what, tol=TOL_LOGITS)
