"""Triton kernels, one module per kernel family.

Importing this package requires ``triton``; :mod:`kdfast.backend` imports it lazily and
reports why when it cannot. Every kernel module lists its compile configurations in
``AOT_CONFIGS`` so that ``python -m kdfast.kernels.triton.aot`` can compile them for GPU
targets without a GPU.
"""
