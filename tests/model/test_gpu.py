"""The same parity on a CUDA device with the automatically chosen kernels (Triton / CUDA). Skipped without CUDA."""

import copy

import pytest
import torch

from tests.model.hf_reference import hf_scores, pack
from vlr_runtime.checkpoint.hf import load_hf_checkpoint
from vlr_runtime.model import ModelArgs, build_reward_model
from vlr_runtime.parallel import setup_distributed, teardown

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_ctx():
    from vlr_kernels import set_default_backend

    set_default_backend(None)  # undo the module-level "torch" of conftest: this file tests the kernels in the model
    teardown()
    ctx = setup_distributed(1)
    assert ctx.device.type == "cuda" and ctx.backend == "nccl"
    yield ctx
    teardown()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_transformers(cuda_ctx, tiny_ckpt, inputs, dtype):
    d, hf, w, b = tiny_ckpt
    samples, pixels, grids = inputs
    ref = hf_scores(hf, samples, pixels, grids, w, b)  # float32 on the CPU
    model = build_reward_model(ModelArgs.from_hf_config(d), dtype=dtype, device=cuda_ctx.device, seed=None)
    load_hf_checkpoint(model, d)
    batch = pack(hf, samples, pixels, grids).to(cuda_ctx.device)
    ours = model.rewards(batch).cpu().double()
    if dtype == torch.float32:
        # Triton's fp32 tl.dot runs on tensor cores in tf32 (10-bit mantissa).
        assert float(((ours - ref).abs() / ref.abs().clamp_min(1e-3)).max()) <= 2e-3
    else:
        hf_gpu = copy.deepcopy(hf).to("cuda", torch.bfloat16)  # a copy: the fixture stays float32 on the CPU
        hf_bf16 = hf_scores(hf_gpu, samples, [p.cuda().bfloat16() for p in pixels], grids, w.cuda().bfloat16(),
                            b.cuda().bfloat16()).cpu()
        err_ours, err_hf = float((ours - ref).abs().max()), float((hf_bf16 - ref).abs().max())
        assert err_ours <= 2 * err_hf + 2e-2 * float(ref.abs().max()), (err_ours, err_hf)
    loss, _, _ = model.loss(batch)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
