"""Kernel family attention_transfer (moved here from kdfast/losses and kdfast/kernels: in progress)."""
