"""Registers, spills, shared memory and occupancy of every GPU kernel, read off the compilers, no GPU needed.

``ptxas -v`` prints, per kernel and architecture, the registers per thread, the bytes spilled to
local memory (a spilling kernel runs several times slower), the stack frame, the static shared
memory and the barriers used. With the threads per block and the dynamic shared memory (known
from the launch: Triton's ``num_warps`` and ``metadata.shared``, a CUDA kernel's
``__launch_bounds__``), the resident blocks per SM follow from each architecture's documented
limits (:data:`ARCH_LIMITS`), exactly as NVIDIA's occupancy calculator (``cuda_occupancy.h``)
computes them:

    blocks/SM = min(max_warps_per_sm // warps_per_block,             (warps)
                    max_blocks_per_sm,                               (blocks)
                    4 * ((regs_per_sm / 4) // regs_per_warp) // warps_per_block,   (registers)
                    smem_per_sm // round_up(smem + reserved, 128),   (shared memory)
                    barriers_per_sm // barriers)                     (barriers, from sm_90)
    regs_per_warp = round_up(registers * 32, 256)
    resident warps/SM = blocks/SM * warps_per_block; occupancy = that / max_warps_per_sm

``python -m kdfast.ops.aot --report`` prints the table of every Triton configuration and every CUDA
C++ kernel (``tests/test_gpu_resources.py`` holds it to :data:`MIN_WARPS_PER_SM` and to no spills).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM limits of one compute capability (bytes for shared memory)."""

    name: str
    regs_per_sm: int
    regs_per_block: int
    max_regs_per_thread: int
    reg_alloc_unit: int  # registers are given to a warp in multiples of this
    sub_partitions: int  # each SM sub-partition (warp scheduler) has a quarter of the register file
    max_warps_per_sm: int
    max_blocks_per_sm: int
    smem_per_sm: int  # usable by blocks, at the largest carve-out
    smem_per_block_optin: int  # the most one block may opt into (excluding the reserved bytes)
    smem_reserved_per_block: int  # kept by the driver for every resident block (sm_80 on)
    smem_alloc_unit: int
    barriers_per_sm: int  # named barriers of all resident blocks together (0: not a limit before sm_90)


# CUDA C++ Programming Guide, "Compute Capabilities", Table "Technical Specifications per Compute
# Capability" (registers, warps, blocks, shared memory per SM and per block, 1 KB reserved per block
# from 8.0), and the allocation granularities of the CUDA Occupancy Calculator (cuda_occupancy.h,
# CUDA 13.0: register unit 256 per warp over 4 sub-partitions, shared memory unit 128 bytes).
# sm_80 is the A100 (164 KB usable shared memory per SM), sm_90 the H100 / H200 (228 KB).
_KB = 1024
ARCH_LIMITS: dict[int, ArchLimits] = {
    80: ArchLimits("A100 (sm_80)", 65536, 65536, 255, 256, 4, 64, 32, 164 * _KB, 163 * _KB, _KB, 128, 0),
    86: ArchLimits("GA10x (sm_86)", 65536, 65536, 255, 256, 4, 48, 16, 100 * _KB, 99 * _KB, _KB, 128, 0),
    89: ArchLimits("AD10x (sm_89)", 65536, 65536, 255, 256, 4, 48, 24, 100 * _KB, 99 * _KB, _KB, 128, 0),
    90: ArchLimits("H100 / H200 (sm_90)", 65536, 65536, 255, 256, 4, 64, 32, 228 * _KB, 227 * _KB, _KB, 128, 64),
}

# The floor every configuration that a launcher can pick must reach: at least one resident block and
# at least 4 resident warps per SM. An SM issues from 4 warp schedulers (one per sub-partition), each
# from its own warps: below 4 resident warps a scheduler has nothing to issue at all, every cycle.
MIN_WARPS_PER_SM = 4


def register_cap(num_warps: int) -> int:
    """``maxnreg`` for a block of ``num_warps`` warps: the most registers per thread with which one block
    still launches on every architecture of :data:`ARCH_LIMITS`, ``min(255, 65536 // (32 num_warps))``.

    Left to itself (no ``.maxnreg`` in the PTX), ptxas picks a register target for a 256- or 512-thread
    block that would fit more blocks per SM (48 or 64 registers) and spills to meet it; with this cap it
    takes the registers the kernel needs, up to the cap, and spills only beyond it. The launchers whose
    kernels ptxas squeezed so pass ``maxnreg=register_cap(num_warps)``, and so do their ``AOT_CONFIGS``."""
    threads = 32 * num_warps
    return min(min(a.max_regs_per_thread for a in ARCH_LIMITS.values()),
               min(a.regs_per_block for a in ARCH_LIMITS.values()) // threads)


# Configurations allowed to spill, each group with the most bytes (stores + loads per thread, on either
# architecture) it may spill and why it stays: a regular expression over "kernel[config]" -> (bytes,
# reason). None today: every configuration a launcher can pick compiles without a spill on sm_80 and
# sm_90. A spill outside these, or above its bound, fails tests/test_gpu_resources.py; an entry that no
# longer matches a spilling configuration fails it too, so the list only shrinks as the kernels are fixed.
SPILL_ALLOWED: dict[str, tuple[int, str]] = {}


@dataclass
class PtxasKernel:
    """One kernel's line of ``ptxas -v`` for one architecture."""

    name: str
    arch: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    smem_bytes: int
    barriers: int


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_BARRIERS = re.compile(r"used (\d+) barriers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_verbose(text: str) -> list[PtxasKernel]:
    """Every entry function of a ``ptxas -v`` log (also ``nvcc -Xptxas -v``), in order.

    A kernel's block starts at ``Compiling entry function 'NAME' for 'sm_XX'``; its
    ``N bytes stack frame, S bytes spill stores, L bytes spill loads`` and ``Used R registers[,
    used B barriers][, M bytes smem]`` lines follow. Absent fields are 0; a kernel without a
    ``Used`` line raises ``ValueError`` (the log is not what this parser knows)."""
    out: list[PtxasKernel] = []
    cur: PtxasKernel | None = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            if cur is not None:
                out.append(cur)
            cur = PtxasKernel(m.group(1), m.group(2), -1, 0, 0, 0, 0, 0)
            continue
        if cur is None:
            continue
        m = _PROPS.search(line)
        if m:
            cur.stack_bytes, cur.spill_stores, cur.spill_loads = map(int, m.groups())
        m = _USED.search(line)
        if m:
            cur.registers = int(m.group(1))
            b, s = _BARRIERS.search(line), _SMEM.search(line)
            cur.barriers = int(b.group(1)) if b else 0
            cur.smem_bytes = int(s.group(1)) if s else 0
    if cur is not None:
        out.append(cur)
    for k in out:
        if k.registers < 0:
            raise ValueError(f"ptxas log: no 'Used N registers' line for {k.name} ({k.arch})")
    return out


@dataclass
class Occupancy:
    blocks_per_sm: int
    warps_per_sm: int
    fraction: float  # resident warps / the SM's maximum
    limiter: str  # what bounds blocks_per_sm: warps, blocks, registers, shared memory, barriers


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(arch: int, threads: int, registers: int, smem_bytes: int, barriers: int = 1) -> Occupancy:
    """Resident blocks and warps per SM of a kernel on compute capability ``arch`` (``cuda_occupancy.h``'s
    rules, default carve-out: the largest shared memory; formulas in the module docstring).

    ``smem_bytes`` is static plus dynamic shared memory per block. A block that cannot launch at all
    (too many registers or too much shared memory) gives 0 blocks."""
    if arch not in ARCH_LIMITS:
        raise ValueError(f"arch must be one of {sorted(ARCH_LIMITS)}, got {arch}")
    if threads < 1 or registers < 0 or smem_bytes < 0 or barriers < 0:
        raise ValueError(f"threads must be >= 1 and registers, smem_bytes, barriers >= 0, got "
                         f"{threads}, {registers}, {smem_bytes}, {barriers}")
    a = ARCH_LIMITS[arch]
    warps = -(-threads // 32)
    limits = {"warps": a.max_warps_per_sm // warps, "blocks": a.max_blocks_per_sm}
    regs_per_warp = _round_up(registers * 32, a.reg_alloc_unit)
    if (registers > a.max_regs_per_thread or regs_per_warp * _round_up(warps, a.sub_partitions) > a.regs_per_block):
        limits["registers"] = 0
    elif regs_per_warp:
        per_partition = (a.regs_per_sm // a.sub_partitions) // regs_per_warp
        limits["registers"] = per_partition * a.sub_partitions // warps
    smem = _round_up(smem_bytes + a.smem_reserved_per_block, a.smem_alloc_unit)
    limits["shared memory"] = 0 if smem_bytes > a.smem_per_block_optin else a.smem_per_sm // smem
    if barriers and a.barriers_per_sm:
        limits["barriers"] = a.barriers_per_sm // barriers
    limiter = min(limits, key=lambda k: limits[k])
    blocks = limits[limiter]
    return Occupancy(blocks, blocks * warps, blocks * warps / a.max_warps_per_sm, limiter)


@dataclass
class KernelResources:
    """One row of the report: one kernel configuration on one architecture."""

    source: str  # "triton" or "cuda"
    kernel: str
    config: str
    arch: int
    threads: int
    registers: int
    spill_stores: int
    spill_loads: int
    smem_static: int
    smem_dynamic: int
    blocks_per_sm: int
    warps_per_sm: int
    occupancy: float
    limiter: str

    @property
    def key(self) -> str:
        return f"{self.kernel}[{self.config}]"

    def to_dict(self) -> dict:
        return asdict(self)


def make_row(source: str, kernel: str, config: str, arch: int, threads: int, ptxas: PtxasKernel,
             smem_dynamic: int = 0) -> KernelResources:
    """A report row from a kernel's ptxas figures, its block size and its dynamic shared memory."""
    occ = occupancy(arch, threads, ptxas.registers, ptxas.smem_bytes + smem_dynamic, ptxas.barriers)
    return KernelResources(source, kernel, config, arch, threads, ptxas.registers, ptxas.spill_stores,
                           ptxas.spill_loads, ptxas.smem_bytes, smem_dynamic, occ.blocks_per_sm, occ.warps_per_sm,
                           round(occ.fraction, 4), occ.limiter)


# --- Triton: ptxas -v on the PTX of each compiled configuration -------------------------------------

def triton_ptxas(arch: int) -> tuple[str, str]:
    """(path of the ptxas Triton compiles with for ``arch``, the ``--gpu-name`` it passes), so that the
    figures are those of the cubin Triton built."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    return get_ptxas(arch).path, sm_arch_from_capability(arch)


def ptxas_verbose(ptx: str, arch: int, fp_fusion: bool = True) -> str:
    """The ``ptxas -v`` log of one PTX module, with the options Triton's own cubin step uses."""
    ptxas, gpu_name = triton_ptxas(arch)
    with tempfile.TemporaryDirectory(prefix="kdfast-ptxas-") as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [ptxas, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v", "--regAllocOptLevel=2",
               f"--gpu-name={gpu_name}", str(src), "-o", str(Path(tmp) / "kernel.cubin")]
        p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"ptxas failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    return p.stdout + p.stderr


def triton_ptxas_log(compiled, arch: int, printed: str = "") -> str:
    """The ``ptxas -v`` log of ``compiled``'s cubin: ``printed`` (what Triton printed while building it)
    when it holds the kernel, else the copy kept beside Triton's cache for this very cubin (by its
    sha256), else ptxas run again on the PTX with Triton's options; kept there for the next run."""
    from triton import knobs

    name = compiled.metadata.name
    keep = Path(knobs.cache.dir) / "kdfast-ptxas" / (hashlib.sha256(compiled.asm["cubin"]).hexdigest() + ".log")
    if any(k.name == name for k in parse_ptxas_verbose(printed)):
        log = printed
    elif keep.exists():
        return keep.read_text()
    else:
        log = ptxas_verbose(compiled.asm["ptx"], arch, getattr(compiled.metadata, "enable_fp_fusion", True))
    try:
        keep.parent.mkdir(parents=True, exist_ok=True)
        tmp = keep.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(log)
        tmp.replace(keep)
    except OSError:  # a read-only cache: the figures stand, only the next run pays ptxas again
        pass
    return log


def triton_row(fn_name: str, config: str, arch: int, compiled, ptxas_log: str) -> KernelResources:
    """The report row of one ``triton.compile`` result from its cubin's ``ptxas -v`` log
    (:func:`triton_ptxas_log`) and its metadata (warps, shared memory)."""
    md = compiled.metadata
    mine = [k for k in parse_ptxas_verbose(ptxas_log) if k.name == md.name]
    if len(mine) != 1:
        raise RuntimeError(f"ptxas -v printed no single entry {md.name!r} for {fn_name} [{config}] sm_{arch}")
    k = mine[0]
    return make_row("triton", fn_name, config, arch, 32 * md.num_warps * getattr(md, "num_ctas", 1), k,
                    smem_dynamic=max(0, md.shared - k.smem_bytes))


# --- CUDA C++: nvcc -Xptxas -v on csrc -----------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
# The flags setup.py compiles csrc/**/*.cu with (tests/test_gpu_resources.py checks they agree).
NVCC_FLAGS = ("-O3", "-std=c++17", "--use_fast_math", "-Xcompiler", "-fPIC")
_MAXNTID = re.compile(r"\.entry\s+(\w+)\s*\((?:.|\n)*?\.maxntid\s+(\d+),\s*(\d+),\s*(\d+)")
_LAUNCH = re.compile(r"<<<([^<>]*)>>>")


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME / CUDA_PATH, /usr/local/cuda, or the PATH (setup.py's order)."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_sources() -> list[Path]:
    return sorted([*(ROOT / "csrc" / "cuda").glob("*.cu"), *(ROOT / "csrc" / "ops").glob("*/*.cu")])


def launch_bounds_from_ptx(ptx: str) -> dict[str, int]:
    """Mangled entry name -> threads per block from its ``.maxntid`` (a kernel's ``__launch_bounds__``)."""
    return {m.group(1): int(m.group(2)) * int(m.group(3)) * int(m.group(4)) for m in _MAXNTID.finditer(ptx)}


def dynamic_smem_launches(source: str) -> list[str]:
    """The ``<<<...>>>`` launch configurations of a .cu file that pass dynamic shared memory (a third
    argument other than 0): the report does not know their size, so the test refuses them."""
    bad = []
    for m in _LAUNCH.finditer(source):
        args = [a.strip() for a in m.group(1).split(",")]
        if len(args) >= 3 and args[2] not in ("0", "0u", "0ul", "0UL", "0ULL"):
            bad.append(m.group(0))
    return bad


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> short names (``kd_fwd_bwd_kernel<__nv_bfloat16>``) through c++filt when present."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return {n: _short_name(d) if d and d != n else n for n, d in zip(names, out)}


def _short_name(demangled: str) -> str:
    """'void ns::(anonymous namespace)::k<T>(T const*, long)' -> 'k<T>': the last name, without arguments."""
    d, depth = demangled.removeprefix("void "), 0
    if d.endswith(")"):
        for i in range(len(d) - 1, -1, -1):
            depth += (d[i] == ")") - (d[i] == "(")
            if depth == 0:
                d = d[:i]
                break
    start = 0
    for i, c in enumerate(d):
        depth += (c in "<(") - (c in ">)")
        if depth == 0 and d.startswith("::", i):
            start = i + 2
    return d[start:]


def cuda_rows(archs: list[int], nvcc: str | None = None, sources: list[Path] | None = None) -> list[KernelResources]:
    """Every CUDA C++ kernel of ``sources`` (default: csrc's .cu files) for each of ``archs``: ``nvcc -c
    -Xptxas -v`` with setup.py's flags (the PTX kept to read each kernel's ``__launch_bounds__``).
    A kernel without a launch bound gets threads 0 and no occupancy (limiter "no __launch_bounds__")."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (CUDA_HOME, /usr/local/cuda, PATH): the CUDA kernels cannot be reported")
    rows = []
    for src in (cuda_sources() if sources is None else sources):
        with tempfile.TemporaryDirectory(prefix="kdfast-nvcc-") as tmp:
            gencode = [x for a in archs for x in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
            cmd = [nvcc, "-c", str(src), "-o", str(Path(tmp) / "k.o"), *NVCC_FLAGS, *gencode, "-Xptxas", "-v",
                   "--keep", "--keep-dir", tmp]
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
            if p.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src.name}: {p.stderr.strip()[-800:]}")
            bounds = {}
            for ptx in Path(tmp).glob("*.ptx"):
                bounds.update(launch_bounds_from_ptx(ptx.read_text()))
        kernels = parse_ptxas_verbose(p.stdout + p.stderr)
        names = demangle(sorted({k.name for k in kernels}))
        rel = src.relative_to(ROOT).as_posix() if src.is_relative_to(ROOT) else src.name
        for k in kernels:
            arch = int(k.arch.removeprefix("sm_").rstrip("a"))
            threads = bounds.get(k.name, 0)
            row = make_row("cuda", names[k.name], rel, arch, max(threads, 1), k)
            if not threads:
                row.threads, row.blocks_per_sm, row.warps_per_sm, row.occupancy = 0, 0, 0, 0.0
                row.limiter = "no __launch_bounds__"
            rows.append(row)
    return rows


# --- the table and its bars ----------------------------------------------------------------------

def problems(rows: list[KernelResources], min_warps: int = MIN_WARPS_PER_SM,
             spill_allowed: dict[str, tuple[int, str]] | None = None) -> list[str]:
    """One line per row that spills without an entry of ``spill_allowed`` (default :data:`SPILL_ALLOWED`)
    whose pattern matches its key and whose bound holds its stores + loads, or holds fewer than
    ``min_warps`` resident warps (or no block) per SM."""
    allowed = SPILL_ALLOWED if spill_allowed is None else spill_allowed
    out = []
    for r in rows:
        where = f"sm_{r.arch} {r.source} {r.key}"
        spilled = r.spill_stores + r.spill_loads
        if spilled and not any(re.search(p, r.key) and spilled <= most for p, (most, _) in allowed.items()):
            out.append(f"{where}: spills {r.spill_stores} B stored / {r.spill_loads} B loaded "
                       f"({r.registers} registers)")
        if r.blocks_per_sm < 1 or r.warps_per_sm < min_warps:
            out.append(f"{where}: {r.warps_per_sm} resident warps per SM ({r.blocks_per_sm} blocks, limited by "
                       f"{r.limiter}), the floor is {min_warps} warps and 1 block")
    return out


def summary(rows: list[KernelResources]) -> list[str]:
    """Per architecture: the most registers, any spills, the lowest occupancy."""
    lines = []
    for arch in sorted({r.arch for r in rows}):
        rs = [r for r in rows if r.arch == arch]
        worst = max(rs, key=lambda r: r.registers)
        low = min(rs, key=lambda r: (r.warps_per_sm, r.occupancy))
        spills = sorted((r for r in rs if r.spill_stores or r.spill_loads),
                        key=lambda r: -(r.spill_stores + r.spill_loads))
        lines.append(f"sm_{arch}: {len(rs)} kernel configurations; most registers {worst.registers}/thread "
                     f"({worst.key}, {worst.threads} threads); spills: "
                     + (f"{len(spills)} configurations ({', '.join(sorted({r.kernel for r in spills}))}), the most "
                        f"{spills[0].spill_stores}/{spills[0].spill_loads} B stored/loaded per thread "
                        f"({spills[0].key})" if spills else "none")
                     + f"; lowest occupancy {low.warps_per_sm} warps/SM = {100 * low.occupancy:.1f}% "
                       f"({low.key}, limited by {low.limiter})")
    return lines


def format_report(rows: list[KernelResources]) -> str:
    """The resource table (one line per kernel configuration and architecture), then the summary."""
    head = (f"{'arch':<6} {'src':<6} {'kernel[config]':<96} {'thr':>5} {'regs':>4} {'spill st/ld B':>13} "
            f"{'smem st+dyn B':>14} {'blk/SM':>6} {'warps/SM':>8} {'occ':>6}  limited by")
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r.arch, r.source, r.key)):
        lines.append(f"sm_{r.arch:<3} {r.source:<6} {r.key:<96} {r.threads:>5} {r.registers:>4} "
                     f"{f'{r.spill_stores}/{r.spill_loads}':>13} {f'{r.smem_static}+{r.smem_dynamic}':>14} "
                     f"{r.blocks_per_sm:>6} {r.warps_per_sm:>8} {100 * r.occupancy:>5.1f}%  {r.limiter}")
    return "\n".join(lines + ["", *summary(rows)])
