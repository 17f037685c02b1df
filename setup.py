"""Build astra_kernels._C: CPU kernels always, CUDA kernels when torch has CUDA and nvcc exists.

Knobs (environment variables):
  ASTRA_SKIP_CUDA=1       build the CPU kernels only
  ASTRA_CUDA_ARCHS="80;90" compute capabilities for the CUDA kernels
  ASTRA_PORTABLE=1        no -march=native (for wheels that travel to other CPUs)
  MAX_JOBS=N              parallel compile jobs (ninja)
  ASTRA_NO_EXT=1          pure-Python install (reference and Triton backends only)

Install with `pip install --no-build-isolation -e .` so the build uses the torch that
is already installed instead of fetching another into an isolated environment.
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _env_flag(name):
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for cand in ([home] if home else []) + ["/usr/local/cuda"]:
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(nvcc)) if nvcc else None


def _cpu_flags():
    """-O3 -fopenmp, native ISA unless ASTRA_PORTABLE, and the ATen vector width to match."""
    flags = ["-O3", "-fopenmp"]
    if _env_flag("ASTRA_PORTABLE"):
        return flags
    try:
        macros = subprocess.run(["c++", "-march=native", "-dM", "-E", "-x", "c++", "/dev/null"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return flags
    flags.append("-march=native")
    # at::vec::Vectorized picks its width from CPU_CAPABILITY_*; ATen sets these
    # per dispatch target, an extension must set them itself.
    if "__AVX512F__" in macros and "__AVX512BW__" in macros and "__AVX512VL__" in macros \
            and "__AVX512DQ__" in macros:
        flags += ["-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
    elif "__AVX2__" in macros and "__FMA__" in macros:
        flags += ["-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


def _extensions():
    if _env_flag("ASTRA_NO_EXT"):
        return [], {}
    cuda_home = None if _env_flag("ASTRA_SKIP_CUDA") else _find_nvcc()
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", cuda_home)
    import torch
    from torch.utils import cpp_extension as ce

    with_cuda = bool(cuda_home) and torch.version.cuda is not None
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx = _cpu_flags()
    link = ["-fopenmp"]
    if not with_cuda:
        ext = ce.CppExtension("astra_kernels._C", sources, include_dirs=include_dirs,
                              extra_compile_args={"cxx": cxx}, extra_link_args=link)
        return [ext], {"cmdclass": {"build_ext": ce.BuildExtension}}

    archs = os.environ.get("ASTRA_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST",
                          ";".join(f"{a[:-1]}.{a[-1]}" for a in archs if a.strip()))
    # pip's CUDA wheels keep the CUDA headers that torch's headers include
    # (cusparse.h, ...) under site-packages/nvidia/cu*/include.
    for sp in sys.path:
        for inc in glob.glob(os.path.join(sp, "nvidia", "cu*", "include")):
            if os.path.isdir(inc) and inc not in include_dirs:
                include_dirs.append(inc)
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
            "-DASTRA_WITH_CUDA"]
    ext = ce.CUDAExtension("astra_kernels._C", sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx + ["-DASTRA_WITH_CUDA"], "nvcc": nvcc},
                           extra_link_args=link)
    return [ext], {"cmdclass": {"build_ext": ce.BuildExtension}}


ext_modules, extra = _extensions()

setup(
    name="astra",
    version=VERSION,
    description="Sequence-parallel Transformer inference over slow links with "
                "vector-quantized attention (ASTRA, arXiv 2505.19342)",
    packages=find_packages(include=["astra_kernels", "astra_kernels.*"])
    + find_packages("python"),
    package_dir={"astra": "python/astra"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "safetensors", "tqdm"],
    extras_require={
        "models": ["transformers", "timm"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "faiss-cpu"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["astra=astra.cli:main"]},
    ext_modules=ext_modules,
    zip_safe=False,
    **extra,
)
