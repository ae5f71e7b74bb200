"""Compile every Triton kernel configuration for real GPU targets, without a GPU.

``python -m kdfast.ops.aot [--arch 90 80]`` runs ``triton.compile`` on each entry of the
``AOT_CONFIGS`` that every Triton implementation in the op registry names for ``GPUTarget("cuda", arch, 32)``: type errors, bad
layouts, shared-memory overflow and other failures that the interpreter lets pass show up here.
Must run without TRITON_INTERPRET (the interpreter replaces the JIT functions).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

# Largest shared memory one block may opt into, bytes (CUDA programming guide, compute capabilities
# table): triton.compile reports what a kernel needs but only a launch would fail on it.
MAX_SHARED_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def kernel_config_lists() -> list:
    """Every ``AOT_CONFIGS`` callable: those the registry's Triton implementations name, once each."""
    from kdfast.ops import registry

    names = set()
    for op in registry.ops():
        impl = registry.impls(op).get("triton")
        if impl is not None and impl.aot_configs:
            names.add(impl.aot_configs)
    out = []
    for name in sorted(names):
        module, attr = name.split(":")
        out.append(getattr(importlib.import_module(module), attr))
    return out


def compile_all(archs: list[int], verbose: bool = False) -> int:
    """Compile every configuration for every arch; returns the number of cubins produced."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: ahead-of-time compilation needs the real JIT functions")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    count = 0
    for configs in kernel_config_lists():
        for fn, signature, constexprs, num_warps in configs():
            for arch in archs:
                t0 = time.perf_counter()
                src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}},
                                constexprs=constexprs)
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
                if not compiled.asm.get("cubin"):
                    raise RuntimeError(f"{fn.__name__} {constexprs} sm_{arch}: no cubin produced")
                shared, limit = compiled.metadata.shared, MAX_SHARED_BYTES.get(arch)
                if limit is not None and shared > limit:
                    raise RuntimeError(f"{fn.__name__} {constexprs} num_warps={num_warps} sm_{arch}: needs {shared} "
                                       f"bytes of shared memory, the limit is {limit}: the launch would fail")
                count += 1
                if verbose:
                    print(f"sm_{arch} {fn.__name__} {signature.get('s_ptr', '')} {constexprs} "
                          f"{time.perf_counter() - t0:.2f}s", flush=True)
    return count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities, e.g. 90 80")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    n = compile_all(args.arch, args.verbose)
    print(f"compiled {n} Triton kernel configurations for sm_{', sm_'.join(map(str, args.arch))} "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
