"""Kernels: the eager float64 reference (``reference``) and the Triton kernels (``triton``)."""
