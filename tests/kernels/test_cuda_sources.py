"""The CUDA extension builds and registers its ops without a GPU: every csrc/cuda/*.cu is compiled with nvcc to an
object, every csrc/cuda/*.cpp against the installed torch headers (the bindings use device-generic torch headers
only, so a CPU-only torch suffices), all linked into vlr_kernels._cuda. A subprocess then loads that library and checks
the torch.ops.vlr_kernels schemas, the fake (meta) implementations torch.compile traces with, and that CPU tensors are
refused by the dispatcher (only a CUDA kernel is registered)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths

REPO = Path(__file__).resolve().parents[2]
CUDA_DIR = REPO / "csrc" / "cuda"
NVCC = shutil.which("nvcc")
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
pytestmark = pytest.mark.skipif(NVCC is None or CXX is None, reason="nvcc or a host C++ compiler is not on PATH")

LOAD_AND_CHECK = r"""
import importlib, importlib.util, sys, torch
from torch._subclasses.fake_tensor import FakeTensorMode
spec = importlib.util.spec_from_file_location("vlr_kernels._cuda", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
sys.modules["vlr_kernels._cuda"] = mod
importlib.import_module("vlr_kernels.reward_loss")._load_cuda_ops()
ops = torch.ops.vlr_kernels
for name in ("reward_fwd", "pair_loss_fwd", "reward_loss_bwd"):
    print(getattr(ops, name).default._schema)
with FakeTensorMode():
    h, g = torch.empty(100, 64, dtype=torch.bfloat16), torch.empty(64, dtype=torch.bfloat16)
    si, pi = torch.zeros(8, dtype=torch.int64), torch.zeros(4, 2, dtype=torch.int64)
    w, b = torch.empty(64, dtype=torch.bfloat16), torch.empty(1, dtype=torch.bfloat16)
    r, rstd, row_ok = ops.reward_fwd(h, si, w, b, g, 1e-6, True)
    loss, acc, ok, coef = ops.pair_loss_fwd(r, pi, None, row_ok, 0.0)
    dh, dw, db, dg = ops.reward_loss_bwd(loss, None, h, si, w, b, g, r, rstd, coef)
    assert r.shape == (8,) and r.dtype == torch.float32 and loss.shape == () and acc.shape == ()
    assert row_ok.shape == (8,) and row_ok.dtype == torch.int32 and ok.shape == () and coef.shape == (8,)
    assert dh.shape == h.shape and dh.dtype == h.dtype and dw.shape == (64,) and db.shape == (1,) and dg.shape == (64,)
try:
    ops.reward_fwd(torch.randn(4, 8), torch.tensor([0, 1]), torch.randn(8), torch.zeros(1), None, 1e-6, False)
    raise SystemExit("a CPU call was accepted")
except NotImplementedError:
    print("cpu refused")
"""


def _cuda_include() -> str:
    """The toolkit's include dir (nvcc may be a wrapper script outside the toolkit, so probe candidates)."""
    candidates = [os.environ.get("CUDA_HOME", ""), str(Path(NVCC).resolve().parents[1]), "/usr/local/cuda"]
    for root in candidates:
        if root and (Path(root) / "include" / "cuda_runtime_api.h").exists():
            return str(Path(root) / "include")
    pytest.skip(f"no CUDA include dir with cuda_runtime_api.h among {candidates}")


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, check=False)
    assert proc.returncode == 0, " ".join(cmd[:3]) + "\n" + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def extension(tmp_path_factory) -> Path:
    """Compile every source and link ``_cuda.so``; returns its path."""
    out = tmp_path_factory.mktemp("cuda_ext")
    cuda_inc = _cuda_include()
    includes = [f"-I{p}" for p in (*include_paths(), cuda_inc, str(CUDA_DIR), sysconfig.get_paths()["include"])]
    arch = os.environ.get("VLR_CUDA_ARCH", "-gencode=arch=compute_90a,code=sm_90a")
    objects = []
    for cu in sorted(CUDA_DIR.glob("*.cu")):
        obj = out / (cu.stem + ".cu.o")
        _run([NVCC, "-c", "-std=c++17", "-O3", "--use_fast_math", arch, "-Xcompiler", "-fPIC", *includes, str(cu),
              "-o", str(obj)])
        objects.append(obj)
    for cpp in sorted(CUDA_DIR.glob("*.cpp")):
        obj = out / (cpp.stem + ".o")
        _run([CXX, "-std=c++17", "-O0", "-fPIC", "-w", "-c", "-DTORCH_EXTENSION_NAME=_cuda", *includes, str(cpp),
              "-o", str(obj)])
        objects.append(obj)
    lib = out / "_cuda.so"
    torch_lib = Path(torch.__file__).parent / "lib"
    cuda_lib = Path(cuda_inc).parent / "lib64"
    _run([CXX, "-shared", *map(str, objects), f"-L{torch_lib}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python",
          f"-L{cuda_lib}", "-lcudart", f"-Wl,-rpath,{torch_lib}", f"-Wl,-rpath,{cuda_lib}", "-o", str(lib)])
    return lib


@pytest.mark.timeout(600)
def test_every_cu_compiles_with_nvcc(extension):
    for cu in CUDA_DIR.glob("*.cu"):
        assert (extension.parent / (cu.stem + ".cu.o")).stat().st_size > 0


@pytest.mark.timeout(600)
def test_extension_loads_and_registers_traceable_ops(extension):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_CHECK, str(extension)], capture_output=True, text=True,
                          timeout=280, env=env, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "vlr_kernels::reward_loss_bwd(Tensor dloss, Tensor? drewards" in proc.stdout
    assert "cpu refused" in proc.stdout
