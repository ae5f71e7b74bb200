"""Kernel family hidden_rows (moved here from kdfast/losses and kdfast/kernels: in progress)."""
