"""Kernel family score_mse (moved here from kdfast/losses and kdfast/kernels: in progress)."""
