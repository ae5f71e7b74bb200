"""Kernel families and the op registry.

One package per kernel family (its contract, the ``torch.library`` schema and fake, one module per
backend), all registering into :mod:`kdfast.ops.registry`, which alone decides which backend runs.
The user-facing losses in :mod:`kdfast.losses` sit on top of :func:`~kdfast.ops.registry.select`.
"""

from kdfast.ops.registry import dispatch, impls, register, resolve, select

__all__ = ["dispatch", "impls", "register", "resolve", "select"]
