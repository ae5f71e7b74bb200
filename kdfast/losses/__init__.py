"""Fused distillation losses, one module per family."""

from kdfast.losses.kd import KDLoss, kd_loss

__all__ = ["KDLoss", "kd_loss"]
