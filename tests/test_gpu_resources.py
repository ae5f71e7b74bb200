"""Every Triton configuration compiled for sm_90 / sm_80 without a GPU (``python -m kdfast.ops.aot``), and
its resources: no configuration a launcher can pick spills registers or holds fewer than
MIN_WARPS_PER_SM warps per SM; the CUDA C++ kernels likewise. One compile serves both: the report
reads the ptxas log Triton prints while it builds each cubin."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdfast.ops import gpu_resources as gr

ROOT = Path(__file__).resolve().parent.parent
NVCC = gr.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None or os.environ.get("KDFAST_NO_CUDA") == "1",
                                reason="nvcc absent (or KDFAST_NO_CUDA=1): the CUDA C++ kernels are left out")


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-resources")
    t0 = time.monotonic()
    jobs = str(min(4, os.cpu_count() or 1))  # the compiles are CPU-bound and independent
    p = subprocess.run([sys.executable, "-m", "kdfast.ops.aot", "--arch", "90", "80", "--jobs", jobs, "--report",
                        str(out / "report.txt"), "--json", str(out / "rows.json")], env=_env(), capture_output=True,
                       text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    print(f"kdfast.ops.aot --report: {time.monotonic() - t0:.0f} s")
    rows = [gr.KernelResources(**d) for d in json.loads((out / "rows.json").read_text())]
    return p.stdout, (out / "report.txt").read_text(), rows


def test_every_triton_configuration_compiles_for_sm90_and_sm80_and_is_reported(report):
    from kdfast.ops.aot import describe, kernel_config_lists

    stdout, _, rows = report
    n = int(re.search(r"compiled (\d+) Triton kernel configurations", stdout).group(1))
    expected = sorted(f"{fn.__name__}[{describe(sig, ce, nw)}]" for configs in kernel_config_lists()
                      for fn, sig, ce, nw in configs())
    assert n == 2 * len(expected) > 0
    for arch in (80, 90):
        keys = sorted(r.key for r in rows if r.source == "triton" and r.arch == arch)
        assert keys == expected, arch  # every configuration once, under a label of its own
    for r in rows:
        assert r.registers > 0 and r.threads >= 32 and r.threads % 32 == 0, r


def test_no_configuration_a_launcher_picks_spills_or_starves_an_sm(report):
    _, _, rows = report
    assert gr.problems(rows) == []
    for pattern, (most, why) in gr.SPILL_ALLOWED.items():  # each allowance still matches a spill, says why
        assert any(re.search(pattern, r.key) and r.spill_stores + r.spill_loads for r in rows), pattern
        assert most > 0 and len(why) > 40, pattern


@needs_nvcc
def test_cuda_kernels_are_reported_with_their_launch_bounds(report):
    _, _, rows = report
    cuda = [r for r in rows if r.source == "cuda"]
    for src in gr.cuda_sources():
        text = src.read_text()
        assert gr.dynamic_smem_launches(text) == [], src  # the report counts static shared memory only
        names = set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", text))
        for name in names:
            for arch in (80, 90):
                got = [r for r in cuda if r.arch == arch and r.kernel.split("<")[0] == name]
                assert got and all(r.threads > 0 for r in got), (name, arch, cuda)


def test_report_file_holds_every_row_and_a_summary_per_arch(report):
    _, text, rows = report
    for r in rows:
        assert r.key in text
    for arch in (80, 90):
        line = next(x for x in text.splitlines() if x.startswith(f"sm_{arch}: "))
        assert "most registers" in line and "spills: " in line and "lowest occupancy" in line
        spilling = [r for r in rows if r.arch == arch and r.spill_stores + r.spill_loads]
        assert (f"spills: {len(spilling)} configurations" if spilling else "spills: none") in line


_SPILL_CU = r"""
__global__ void __launch_bounds__(128, 16) heavy(const float* x, float* y, int n) {
  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = x[threadIdx.x + i * n];
#pragma unroll
  for (int r = 0; r < 6; ++r)
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = acc[i] * acc[(i + r + 1) % 64] + acc[(i * 7 + r) % 64];
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 64; ++i) s += acc[i] * (i + 1);
  y[threadIdx.x] = s;
}
__global__ void __launch_bounds__(256) light(const float* x, float* y) { y[threadIdx.x] = 2.f * x[threadIdx.x]; }
"""


@needs_nvcc
def test_ptxas_figures_on_real_output_catch_a_spilling_kernel(tmp_path):
    """The report's CUDA path on a kernel squeezed into 32 registers (its launch bound asks for 16 blocks
    of 128 threads per SM): ptxas spills it, the parser reads the spill bytes, and the check flags it
    unless it is allowed with a reason."""
    src = tmp_path / "spill.cu"
    src.write_text(_SPILL_CU)
    rows = gr.cuda_rows([80, 90], sources=[src])
    by = {(r.kernel, r.arch): r for r in rows}
    assert set(by) == {(k, a) for k in ("heavy", "light") for a in (80, 90)}, by
    for arch in (80, 90):
        heavy, light = by["heavy", arch], by["light", arch]
        assert heavy.spill_stores > 0 and heavy.spill_loads > 0 and heavy.registers <= 32
        assert light.spill_stores == light.spill_loads == 0
        assert (heavy.threads, light.threads) == (128, 256)  # from the PTX's .maxntid
        assert light.warps_per_sm == gr.occupancy(arch, 256, light.registers, light.smem_static).warps_per_sm
    flagged = gr.problems(rows, spill_allowed={})
    assert len(flagged) == 2 and all("heavy" in x and "spills" in x for x in flagged)
    most = max(r.spill_stores + r.spill_loads for r in rows)
    allow = {re.escape(by["heavy", 80].key): (most, "measured faster than the 32-register build")}
    assert gr.problems(rows, spill_allowed=allow) == []
    tight = {re.escape(by["heavy", 80].key): (most - 1, "a bound below what it spills")}
    assert len(gr.problems(rows, spill_allowed=tight)) >= 1
    assert gr.problems(rows, min_warps=65, spill_allowed=allow)  # above any SM's warps


def _cuobjdump() -> str | None:
    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except Exception:
        return shutil.which("cuobjdump")


_TRITON_PROBE = r"""
import json, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kdfast.ops import gpu_resources as gr
from kdfast.ops.hidden_rows import triton as hr

fn, sig, ce, nw = next(hr.aot_configs())
out = []
for arch in (80, 90):
    c = triton.compile(ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in ce}}, constexprs=ce),
                       target=GPUTarget("cuda", arch, 32), options={"num_warps": nw})
    row = gr.triton_row(fn.__name__, "probe", arch, c, gr.ptxas_verbose(c.asm["ptx"], arch))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(c.asm["cubin"]); f.flush()
        res = subprocess.run([sys.argv[1], "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    out.append({"arch": arch, "row": row.to_dict(), "cuobjdump": res})
print(json.dumps(out))
"""


def test_triton_figures_are_those_of_the_cubin_triton_built():
    """ptxas -v on a configuration's PTX reads the same registers and shared memory as the cubin
    Triton built (cuobjdump's resource usage, an independent reader)."""
    tool = _cuobjdump()
    if not tool or not os.path.exists(tool):
        pytest.skip("no cuobjdump (Triton's bundled one or on PATH)")
    p = subprocess.run([sys.executable, "-c", _TRITON_PROBE, tool], env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for item in json.loads(p.stdout.strip().splitlines()[-1]):
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", item["cuobjdump"])
        assert m, item["cuobjdump"]
        reg, _, shared, local = map(int, m.groups())
        row = item["row"]
        # sm_90 cubins count the 1 KB the driver reserves per block in their shared memory; ptxas does not
        reserved = gr.ARCH_LIMITS[item["arch"]].smem_reserved_per_block if item["arch"] >= 90 else 0
        assert row["registers"] == reg and row["smem_static"] == shared - reserved, (item["arch"], row, m.group(0))
        assert row["spill_stores"] == 0 and local == 0


_OCC_MAIN = r"""
#include <cstdio>
#include <cuda_occupancy.h>
int main() {
  int major, minor, warps, blocks, threads, regs, barriers; long smem_sm, optin, smem;
  while (scanf("%d %d %d %ld %ld %d %d %ld %d", &major, &minor, &warps, &smem_sm, &optin, &threads, &regs, &smem,
               &barriers) == 9) {
    cudaOccDeviceProp prop;
    prop.computeMajor = major; prop.computeMinor = minor; prop.maxThreadsPerBlock = 1024;
    prop.maxThreadsPerMultiprocessor = warps * 32; prop.regsPerBlock = 65536; prop.regsPerMultiprocessor = 65536;
    prop.warpSize = 32; prop.sharedMemPerBlock = 48 * 1024; prop.sharedMemPerMultiprocessor = smem_sm;
    prop.numSms = 100; prop.sharedMemPerBlockOptin = optin; prop.reservedSharedMemPerBlock = 1024;
    cudaOccFuncAttributes attr;
    attr.maxThreadsPerBlock = 1024; attr.numRegs = regs; attr.sharedSizeBytes = 0;
    attr.shmemLimitConfig = FUNC_SHMEM_LIMIT_OPTIN; attr.maxDynamicSharedSizeBytes = optin;
    attr.numBlockBarriers = barriers;
    cudaOccDeviceState state;
    cudaOccResult result;
    cudaOccError err = cudaOccMaxActiveBlocksPerMultiprocessor(&result, &prop, &attr, &state, threads, smem);
    printf("%d\n", err == CUDA_OCC_SUCCESS ? result.activeBlocksPerMultiprocessor : -1);
  }
}
"""


def test_occupancy_agrees_with_nvidias_calculator(tmp_path):
    """kdfast's occupancy against cuda_occupancy.h (the CUDA Occupancy Calculator, host code) on random
    block sizes, registers, shared memory and barriers, for every architecture in ARCH_LIMITS."""
    header = next((Path(h) / "include" for h in ("/usr/local/cuda", os.environ.get("CUDA_HOME") or "/nonexistent")
                   if (Path(h) / "include" / "cuda_occupancy.h").exists()), None)
    if header is None and NVCC:
        header = Path(NVCC).resolve().parent.parent / "include"
    cxx = shutil.which("g++") or shutil.which("c++")
    if header is None or not (header / "cuda_occupancy.h").exists() or not cxx:
        pytest.skip("no cuda_occupancy.h or no C++ compiler")
    exe = tmp_path / "occ"
    (tmp_path / "occ.cpp").write_text(_OCC_MAIN)
    subprocess.run([cxx, "-O1", "-I", str(header), str(tmp_path / "occ.cpp"), "-o", str(exe)], check=True)
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    cases = []
    for _ in range(3000):
        arch = rng.choice(sorted(gr.ARCH_LIMITS))
        a = gr.ARCH_LIMITS[arch]
        threads = rng.choice([32 * rng.randint(1, 32), rng.randint(1, 1024)])
        regs = rng.choice([0, rng.randint(1, 255), rng.randint(16, 96)])
        smem = rng.choice([0, rng.randint(0, 4096), rng.randint(0, a.smem_per_block_optin + 2048)])
        barriers = rng.choice([0, 1, 1, rng.randint(1, 16)])
        cases.append((arch, threads, regs, smem, barriers))
    lines = "\n".join(f"{arch // 10} {arch % 10} {gr.ARCH_LIMITS[arch].max_warps_per_sm} "
                      f"{gr.ARCH_LIMITS[arch].smem_per_sm} {gr.ARCH_LIMITS[arch].smem_per_block_optin} "
                      f"{t} {r} {s} {b}" for arch, t, r, s, b in cases)
    got = subprocess.run([str(exe)], input=lines, capture_output=True, text=True, check=True).stdout.split()
    assert len(got) == len(cases)
    for (arch, t, r, s, b), ref in zip(cases, got):
        ours = gr.occupancy(arch, t, r, s, b)
        assert ours.blocks_per_sm == int(ref), (seed, arch, t, r, s, b, ours, ref)


def test_nvcc_flags_are_those_setup_py_builds_with():
    setup = (ROOT / "setup.py").read_text()
    cmd = re.search(r'cmd = \[nvcc, "-c", str\(src\), "-o", str\(obj\), (.*?)\]', setup, re.S).group(1)
    assert [f.strip().strip('"') for f in cmd.split(",") if f.strip().startswith('"')] == list(gr.NVCC_FLAGS)


def test_dynamic_shared_memory_launches_are_found():
    assert gr.dynamic_smem_launches("k<<<grid, 256, 0, stream>>>(a); k<<<g, b>>>(x);") == []
    assert gr.dynamic_smem_launches("k<<<grid, 256, bytes, stream>>>(a);") == ["<<<grid, 256, bytes, stream>>>"]


def test_parser_refuses_a_log_without_registers():
    with pytest.raises(ValueError, match="no 'Used N registers'"):
        gr.parse_ptxas_verbose("ptxas info    : Compiling entry function 'k' for 'sm_80'\n")
    with pytest.raises(ValueError, match="arch must be one of"):
        gr.occupancy(75, 128, 32, 0)


def test_aot_refuses_an_unknown_arch_in_one_line():
    p = subprocess.run([sys.executable, "-m", "kdfast.ops.aot", "--arch", "75", "--report"], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "--arch must be among" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def _compiled(configs) -> dict[str, list[tuple[dict, int, dict]]]:
    """kernel name -> [(constexprs and launch options but num_warps, num_warps, signature)] of an
    AOT_CONFIGS list."""
    from kdfast.ops.aot import launch_options

    out: dict[str, list[tuple[dict, int, dict]]] = {}
    for fn, sig, ce, options in configs():
        opts = launch_options(options)
        nw = opts.pop("num_warps")
        out.setdefault(fn.__name__, []).append(({**ce, **opts}, nw, sig))
    return out


def _registers(meta: dict, num_warps: int) -> int:
    """The registers per thread ptxas may take for a launch: its ``maxnreg``, else the block's cap."""
    return meta.get("maxnreg") or gr.register_cap(num_warps)


def _uncovered(compiled, kernel: str, pick: dict, blocks: tuple[str, ...], dtype: tuple[str, str]) -> bool:
    """True unless a configuration of ``kernel`` compiled ahead of time has ``pick``'s constexprs and the
    element type ``dtype`` = (argument, Triton type) in its signature, except for the block sizes ``blocks``
    and ``maxnreg``: with ``pick``'s warps, each of those as large or larger; with more warps (fewer
    registers available per thread), at least as many block elements per thread; and no more registers
    per thread (``maxnreg``, or the block's cap without one) than ``pick`` lets ptxas take. Either way the
    same program holds at least as many values per thread with no more registers each, so it spills if
    ``pick`` does."""
    pick = dict(pick)
    warps = pick.pop("num_warps")
    arg, ty = dtype

    def per_thread(ce, nw):
        return math.prod(ce[k] for k in blocks) / nw

    return not any(sig[arg] == f"*{ty}"
                   and all(ce.get(k) == v for k, v in pick.items() if k not in (*blocks, "maxnreg"))
                   and _registers(ce, nw) <= _registers(pick, warps)
                   and (all(ce[k] >= pick[k] for k in blocks) if nw == warps else
                        nw > warps and per_thread(ce, nw) >= per_thread(pick, warps))
                   for ce, nw, sig in compiled[kernel])


def test_gpu_launch_constants_of_every_shape_are_compiled_ahead_of_time():
    """The GPU launch constants each Triton launcher picks over a sweep of shapes and dtypes are those of a
    configuration the report covers (or of a smaller block at the same warps), so that no spill hides in a
    configuration only a GPU run would build."""
    import torch

    from kdfast.ops import registry
    from kdfast.ops.attention_transfer import FLASH_OP, flash_cols
    from kdfast.ops.attention_transfer import triton as at
    from kdfast.ops.hidden_rows import MAX_COSINE_WIDTH
    from kdfast.ops.hidden_rows import triton as hr
    from kdfast.ops.logit_kd import triton as lk
    from kdfast.ops.mobilebert_blocks import triton as mb
    from kdfast.ops.score_mse import triton as sm
    from kdfast.ops.sparse_kd import triton as sk

    bad = []
    kd, sparse, attn = _compiled(lk.AOT_CONFIGS), _compiled(sk.AOT_CONFIGS), _compiled(at.AOT_CONFIGS)
    hidden, score, blocks = _compiled(hr.AOT_CONFIGS), _compiled(sm.AOT_CONFIGS), _compiled(mb.AOT_CONFIGS)
    for dtype, ty in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        for V in (1, 5, 100, 1000, 1024, 1025, 2048, 3000, 4096, 5000, 8192, 8193, 16384, 30522, 50257, 128256):
            pick = lk.row_block_meta(V, cuda=True)
            assert pick["BLOCK_V"] <= lk.MAX_BLOCK_V_GPU and pick["SINGLE_BLOCK"] == (V <= lk.MAX_SINGLE_BLOCK_V_GPU)
            assert V <= pick["BLOCK_V"] or not pick["SINGLE_BLOCK"]
            bad += [("kd", ty, V)] * _uncovered(kd, "kd_fwd_bwd_kernel", pick, ("BLOCK_V",), ("s_ptr", ty))
            bad += [("sparse_kd", ty, V)] * _uncovered(sparse, "sparse_kd_fwd_bwd_kernel", pick, ("BLOCK_V",),
                                                        ("s_ptr", ty))
        for ds in (8, 16, 24, 32, 48, 64, 96, 128):
            for dt in (8, 16, 32, 64, 96, 128, 192, 256):
                # the registry runs heads the GPU tiles do not take on the torch backend, and tile_meta refuses them
                takes = at.triton_takes_heads(ds, dt)
                assert takes == (flash_cols(ds, dt) <= registry.impls(FLASH_OP)["triton"].max_cols)
                if not takes:
                    with pytest.raises(ValueError, match="head dims must be at most"):
                        at.tile_meta(ds, dt, dtype, cuda=True)
                    continue
                tile = at.tile_meta(ds, dt, dtype, cuda=True)
                for kernel in ("_at_fwd_kernel", "_at_dq_kernel", "_at_dk_kernel"):
                    pick = at.launch_meta(tile, getattr(at, kernel))
                    bad += [(kernel, ty, ds, dt)] * _uncovered(attn, kernel, pick, ("BLOCK_DS", "BLOCK_DT"),
                                                               ("qs_ptr", ty))
        for D in (1, 100, 312, 768, 1024, 1025, 2048, 4096, 4097, 8192, 16384):
            bad += [("mse_epilogue", ty, D)] * _uncovered(hidden, "_mse_epilogue_kernel",
                                                          hr.block_meta(D, hr.MAX_BLOCK_GPU), ("BLOCK_D",), ("t_ptr", ty))
            if D <= MAX_COSINE_WIDTH:
                bad += [("cosine", ty, D)] * _uncovered(hidden, "_cosine_kernel", hr.block_meta(D, MAX_COSINE_WIDTH),
                                                        ("BLOCK_D",), ("s_ptr", ty))
            for kernel in ("_score_mse_fwd_kernel", "_score_mse_bwd_kernel"):
                for has_mask in (False, True):
                    bad += [(kernel, ty, D)] * _uncovered(score, kernel, sm._launch_meta(D, True, has_mask),
                                                          ("BLOCK_L",), ("s_ptr", ty))
        for D in (128, 512):  # MobileBERT's widths: compiled as picked
            block_d, block_n, rows, warps = mb._blocks(D, torch.device("cuda"))
            tile = dict(BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps)
            bwd_tile = {**tile, "maxnreg": gr.register_cap(warps)}  # what nonorm_bwd_triton launches with
            for has_b in (False, True):
                for has_r in (False, True):
                    bad += [("nonorm", ty, D)] * _uncovered(blocks, "nonorm_fwd_kernel",
                                                            {**tile, "HAS_B": has_b, "HAS_R": has_r}, (), ("x_ptr", ty))
                    bad += [("nonorm_bwd", ty, D)] * _uncovered(
                        blocks, "nonorm_bwd_kernel", {**bwd_tile, "HAS_B": has_b, "HAS_R": has_r, "ROWS_PER_PROG": rows},
                        (), ("x_ptr", ty))
            bad += [("relu_bwd_colsum", ty, D)] * _uncovered(blocks, "relu_bwd_colsum_kernel",
                                                             {**tile, "ROWS_PER_PROG": rows}, (), ("dh_ptr", ty))
    assert bad == [], bad
