"""Kernel family logit_kd (moved here from kdfast/losses and kdfast/kernels: in progress)."""
