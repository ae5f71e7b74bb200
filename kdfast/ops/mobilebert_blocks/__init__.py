"""Kernel family mobilebert_blocks (moved here from kdfast/losses and kdfast/kernels: in progress)."""
