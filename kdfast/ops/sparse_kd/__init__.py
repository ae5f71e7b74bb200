"""Kernel family sparse_kd (moved here from kdfast/losses and kdfast/kernels: in progress)."""
