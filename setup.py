"""Build only what pyproject.toml cannot: the native extensions and the `kernels/` -> `vlr_kernels` mapping.

* `vlr_runtime._C`   pybind11, from every `csrc/*.cpp` (CPU data hot loops). Always built.
* `vlr_kernels._cuda` from `csrc/cuda/*.cu`, built only when the build environment has a CUDA-enabled torch and
  nvcc (use `pip install --no-build-isolation -e .` on a GPU machine so the build sees the installed torch).
  A CPU-only install skips it and says so.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _packages():
    runtime = find_packages(HERE, include=["vlr_runtime", "vlr_runtime.*"])
    kernels = ["vlr_kernels"] + ["vlr_kernels." + p for p in find_packages(os.path.join(HERE, "kernels"))]
    return runtime + kernels


def _cpp_extension():
    from pybind11.setup_helpers import Pybind11Extension

    sources = sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        return []
    return [Pybind11Extension("vlr_runtime._C", sources, cxx_std=17, extra_compile_args=["-O3"])]


def _cuda_extension():
    sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    if not sources or os.environ.get("VLR_SKIP_CUDA") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        print("vlr_runtime: torch not importable in the build environment; skipping the CUDA extension")
        return [], {}
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        print("vlr_runtime: CPU-only torch or no nvcc; skipping the CUDA extension")
        return [], {}
    arch = os.environ.get("VLR_CUDA_ARCH", "-gencode=arch=compute_90a,code=sm_90a")
    ext = CUDAExtension(
        "vlr_kernels._cuda",
        sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo", arch]},
    )
    return [ext], {"build_ext": BuildExtension}


cuda_exts, cmdclass = _cuda_extension()
setup(
    packages=_packages(),
    package_dir={"vlr_runtime": "vlr_runtime", "vlr_kernels": "kernels"},
    ext_modules=_cpp_extension() + cuda_exts,
    cmdclass=cmdclass,
)
