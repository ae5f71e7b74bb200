"""Fused distillation losses, one module per family."""

from kdfast.losses.attention import attention_kl_loss, attention_mse_loss, flash_attention_transfer
from kdfast.losses.kd import KDLoss, kd_loss

__all__ = ["KDLoss", "attention_kl_loss", "attention_mse_loss", "flash_attention_transfer", "kd_loss"]
