"""Compile every Triton kernel configuration for real GPU targets, without a GPU; report their resources.

``python -m kdfast.ops.aot [--arch 90 80] [--jobs N]`` runs ``triton.compile`` on each entry of the
``AOT_CONFIGS`` that every Triton implementation in the op registry names for ``GPUTarget("cuda", arch,
32)``; an entry is ``(kernel, signature, constexprs, options)``, ``options`` the launch's ``num_warps`` or
the dict of Triton options its launcher passes (``num_warps`` and, where set, ``maxnreg``). Type errors,
bad layouts, shared-memory overflow and other failures that the interpreter lets pass show up here.
``--report [PATH]`` also runs ``ptxas -v`` on each compiled configuration's PTX and ``nvcc -Xptxas -v``
on the CUDA C++ kernels, prints registers, spills, shared memory and occupancy per kernel and
architecture (:mod:`kdfast.ops.gpu_resources`) and writes the table to PATH (default
``benchmarks/results/gpu-resources-sm80-sm90.txt`` for ``--arch 90 80``); ``--json PATH`` writes its rows.
Must run without TRITON_INTERPRET (the interpreter replaces the JIT functions).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import sys
import time
from pathlib import Path

from kdfast.ops.gpu_resources import (
    ARCH_LIMITS,
    ROOT,
    KernelResources,
    cuda_rows,
    find_nvcc,
    format_report,
    triton_ptxas_log,
    triton_row,
)

# Largest shared memory one block may opt into, bytes (the architectures' table in gpu_resources):
# triton.compile reports what a kernel needs but only a launch would fail on it.
MAX_SHARED_BYTES = {arch: a.smem_per_block_optin for arch, a in ARCH_LIMITS.items()}


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


# Triton launch options an AOT_CONFIGS entry may carry besides num_warps, and their letter in a label.
LAUNCH_OPTIONS = {"maxnreg": "r", "num_stages": "s"}


def launch_options(options: int | dict) -> dict:
    """An ``AOT_CONFIGS`` entry's options as the dict ``triton.compile`` takes: ``{"num_warps": n}`` for
    a bare ``n``, else the dict itself (``num_warps`` required, others among :data:`LAUNCH_OPTIONS`)."""
    opts = {"num_warps": options} if isinstance(options, int) else dict(options)
    unknown = set(opts) - {"num_warps", *LAUNCH_OPTIONS}
    if "num_warps" not in opts or unknown:
        raise ValueError(f"options must hold num_warps and only {sorted(LAUNCH_OPTIONS)} besides, got {options!r}")
    return opts


def describe(signature: dict, constexprs: dict, options: int | dict) -> str:
    """A configuration's label: its pointer element types (index types left out), constexprs, warps
    (``w8``), then any other launch option (``r128``: ``maxnreg=128``; ``s2``: ``num_stages=2``)."""
    opts = launch_options(options)
    kinds = dict.fromkeys(t.lstrip("*") for t in signature.values() if t.startswith("*"))
    dtypes = ",".join(k for k in kinds if k not in ("i64", "i32", "i8")) or "-"
    consts = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items())
    extra = "".join(f" {letter}{opts[k]}" for k, letter in LAUNCH_OPTIONS.items() if opts.get(k) is not None)
    return f"{dtypes} {consts} w{opts['num_warps']}{extra}"


def all_configs() -> list[tuple]:
    """Every (kernel, signature, constexprs, options) of :func:`kernel_config_lists`, in order."""
    return [cfg for configs in kernel_config_lists() for cfg in configs()]


_CONFIGS: list[tuple] | None = None  # per process: the pool's workers enumerate once each


def compile_one(index: int, arch: int, report: bool = False) -> tuple[str, str, float, float, dict | None]:
    """Compile configuration ``index`` of :func:`all_configs` for ``arch``; returns (kernel, configuration
    label, seconds compiling, seconds reading its resources, its resource row as a dict when ``report``:
    read from the ptxas log Triton prints while building the cubin, kept beside Triton's cache for the
    runs that find the cubin there, see :func:`~kdfast.ops.gpu_resources.triton_ptxas_log`)."""
    global _CONFIGS
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: ahead-of-time compilation needs the real JIT functions")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if _CONFIGS is None:
        _CONFIGS = all_configs()
    fn, signature, constexprs, options = _CONFIGS[index]
    label = describe(signature, constexprs, options)
    t0 = time.perf_counter()
    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
    log = io.StringIO()
    with triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log if report else sys.stdout):
        triton.knobs.nvidia.dump_ptxas_log = report
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=launch_options(options))
    if not compiled.asm.get("cubin"):
        raise RuntimeError(f"{fn.__name__} [{label}] sm_{arch}: no cubin produced")
    shared, limit = compiled.metadata.shared, MAX_SHARED_BYTES.get(arch)
    if limit is not None and shared > limit:
        raise RuntimeError(f"{fn.__name__} [{label}] sm_{arch}: needs {shared} bytes of shared memory, the limit "
                           f"is {limit}: the launch would fail")
    t1 = time.perf_counter()
    row = (triton_row(fn.__name__, label, arch, compiled, triton_ptxas_log(compiled, arch, log.getvalue())).to_dict()
           if report else None)
    return fn.__name__, label, t1 - t0, time.perf_counter() - t1, row


def compile_all(archs: list[int], verbose: bool = False, report: bool = False, jobs: int = 1,
                kernel: str | None = None) -> list[tuple[dict | None, float, float]]:
    """Compile every configuration (of the kernels whose name matches the regular expression ``kernel``,
    when given) for every arch, over ``jobs`` processes; one entry per cubin produced: (its resource row
    as a dict with ``report``, else None; seconds compiling; seconds reading resources)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: ahead-of-time compilation needs the real JIT functions")
    configs = all_configs()
    tasks = [(i, arch) for i in range(len(configs)) for arch in archs
             if kernel is None or re.search(kernel, configs[i][0].__name__)]
    out = []

    def done(arch, result):
        name, label, seconds, report_s, row = result
        out.append((row, seconds, report_s))
        if verbose:
            print(f"sm_{arch} {name} [{label}] compile {seconds:.2f}s" + (f", resources {report_s:.2f}s"
                                                                           if report else ""), flush=True)

    if jobs <= 1:
        for i, arch in tasks:
            done(arch, compile_one(i, arch, report))
        return out
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [(arch, pool.submit(compile_one, i, arch, report)) for i, arch in tasks]
        for arch, f in futures:
            done(arch, f.result())
    return out


def default_report_path(archs: list[int]) -> Path:
    """benchmarks/results/gpu-resources-sm80-sm90.txt in a source checkout (else the working directory)."""
    name = "gpu-resources-" + "-".join(f"sm{a}" for a in sorted(archs)) + ".txt"
    results = ROOT / "benchmarks" / "results"
    return results / name if results.is_dir() else Path(name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities, e.g. 90 80")
    ap.add_argument("--report", nargs="?", const="", default=None, metavar="PATH",
                    help="also report registers, spills, shared memory and occupancy; write the table to PATH "
                         "(default benchmarks/results/gpu-resources-sm80-sm90.txt)")
    ap.add_argument("--json", metavar="PATH", help="with --report: also write the rows as JSON")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="compile in this many processes (default 1)")
    ap.add_argument("--kernel", metavar="REGEX", help="only the kernels whose name matches (the report is then "
                                                      "partial: not for benchmarks/results)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    unknown = [a for a in args.arch if a not in ARCH_LIMITS]
    if unknown:
        print(f"kdfast.ops.aot: --arch must be among {sorted(ARCH_LIMITS)}, got {unknown}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"kdfast.ops.aot: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    done = compile_all(args.arch, args.verbose, report=args.report is not None, jobs=args.jobs, kernel=args.kernel)
    rows = [row for row, _, _ in done]
    print(f"compiled {len(rows)} Triton kernel configurations for sm_{', sm_'.join(map(str, args.arch))} "
          f"in {time.perf_counter() - t0:.1f}s ({args.jobs} process{'es' if args.jobs > 1 else ''}; "
          f"summed over configurations: {sum(d[1] for d in done):.0f}s compiling"
          + (f", {sum(d[2] for d in done):.0f}s reading resources: ptxas runs again only for a cubin "
             "from Triton's cache without its kept log)" if args.report is not None else ")"))
    if args.report is None:
        return 0
    rows = [KernelResources(**r) for r in rows]
    if find_nvcc() is None:
        print("nvcc not found (CUDA_HOME, /usr/local/cuda, PATH): the CUDA C++ kernels are not in the report")
    else:
        t1 = time.perf_counter()
        rows += cuda_rows(sorted(args.arch))
        print(f"nvcc -Xptxas -v on the CUDA C++ kernels: {time.perf_counter() - t1:.1f}s")
    text = format_report(rows)
    print(text)
    path = Path(args.report) if args.report else default_report_path(args.arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"kdfast GPU kernel resources (python -m kdfast.ops.aot --report): registers per thread and "
                    f"spills from ptxas -v, occupancy from {', '.join(ARCH_LIMITS[a].name for a in sorted(args.arch))} "
                    f"limits (kdfast.ops.gpu_resources.ARCH_LIMITS)\n\n{text}\n")
    print(f"wrote {path}")
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
