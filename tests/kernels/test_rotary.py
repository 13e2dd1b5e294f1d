"""Rotary: the cos/sin builders equal transformers' Qwen2.5-VL rotary modules exactly; apply_rotary (Triton through the
interpreter on CPU) vs the float64 reference and vs HF's apply functions; gradcheck; bad inputs; bf16 rule on GPU."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf
from transformers.vision_utils import get_vision_position_ids
from vlr_kernels import _tune as tune_module
from vlr_kernels import (
    apply_rotary,
    apply_rotary_qk,
    apply_rotary_ref,
    mrope_cos_sin,
    rope_inv_freq,
    vision_rope_cos_sin,
)

from tests.kernels.helpers import assert_bf16_rule, assert_close64, to64

rotary_module = importlib.import_module("vlr_kernels.rotary")  # the package exports names that shadow modules

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_mrope_cos_sin_equals_hf():
    text = {
        "hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    }
    cfg = Qwen2_5_VLConfig(text_config=text).text_config
    emb = hf.Qwen2_5_VLRotaryEmbedding(cfg)
    pos = torch.stack([torch.arange(37), torch.randint(0, 40, (37,)), torch.randint(0, 40, (37,))])
    cos_hf, sin_hf = emb(torch.zeros(1), pos[:, None])
    cos, sin = mrope_cos_sin(pos, rope_inv_freq(128, 1e6), [16, 24, 24])
    assert torch.equal(cos, cos_hf[0]) and torch.equal(sin, sin_hf[0])
    cos_1d, _ = mrope_cos_sin(pos[0], rope_inv_freq(128, 1e6), [16, 24, 24])
    cos_hf_1d, _ = emb(torch.zeros(1), pos[0][None].expand(3, 1, -1))
    assert torch.equal(cos_1d, cos_hf_1d[0])


def test_vision_rope_cos_sin_equals_hf():
    vcfg = Qwen2_5_VLConfig(vision_config={"hidden_size": 160, "num_heads": 2}).vision_config  # head_dim 80
    emb = hf.Qwen2_5_VLVisionRotaryEmbedding(vcfg)
    pos = get_vision_position_ids(torch.tensor([[1, 4, 6], [1, 2, 2], [2, 6, 4]]), 2)
    cos_hf, sin_hf = emb(torch.zeros(1), pos)
    cos, sin = vision_rope_cos_sin(pos, rope_inv_freq(40, 1e4))
    assert cos.shape == (pos.shape[0], 80)
    assert torch.equal(cos, cos_hf) and torch.equal(sin, sin_hf)


def test_reference_equals_hf_apply_functions():
    q, k = torch.randn(9, 4, 80), torch.randn(9, 2, 80)
    cos, sin = torch.randn(9, 80), torch.randn(9, 80)
    q_hf, k_hf = hf.apply_rotary_pos_emb_vision(q, k, cos, sin)
    assert torch.equal(apply_rotary_ref(q, cos, sin), q_hf) and torch.equal(apply_rotary_ref(k, cos, sin), k_hf)
    q64, c64, s64 = q.double(), cos.double(), sin.double()
    q_llm, _ = hf.apply_rotary_pos_emb(q64.transpose(0, 1)[None], q64.transpose(0, 1)[None], c64[None], s64[None])
    torch.testing.assert_close(apply_rotary_ref(q64, c64, s64), q_llm[0].transpose(0, 1))


def _mrope_inputs(t_rows, head_dim):
    pos = torch.stack([torch.arange(t_rows), torch.arange(t_rows) // 3, torch.arange(t_rows) % 5])
    half = head_dim // 2
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    return mrope_cos_sin(pos, rope_inv_freq(head_dim, 1e6), section)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("t_rows, heads, head_dim", [(13, 3, 80), (7, 28, 128), (1, 1, 2), (5, 2, 36)], ids=str)
def test_triton_matches_float64_reference(t_rows, heads, head_dim, dtype):
    cos, sin = _mrope_inputs(t_rows, head_dim)
    cos, sin = cos.to(DEV), sin.to(DEV)
    x = torch.randn(t_rows, heads, head_dim, device=DEV).to(dtype).requires_grad_()
    y = apply_rotary(x, cos, sin, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    (x64,) = to64(x)
    y64 = apply_rotary_ref(x64, cos.double(), sin.double())
    y64.backward(dy.double())
    assert y.dtype == dtype and y.shape == x.shape
    assert_close64(y, y64, dtype, "y")
    assert_close64(x.grad, x64.grad, dtype, "dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fused_qk_gqa_matches_float64_reference(dtype):
    _check_qk_against_float64(9, 7, 3, 128, dtype)  # GQA with head counts that fill no block evenly


def _check_qk_against_float64(t_rows: int, hq: int, hk: int, d: int, dtype: torch.dtype) -> None:
    """apply_rotary_qk (triton) outputs and both input gradients against the float64 torch reference."""
    cos, sin = (t.to(DEV) for t in _mrope_inputs(t_rows, d))
    q = torch.randn(t_rows, hq, d, device=DEV).to(dtype).requires_grad_()
    k = torch.randn(t_rows, hk, d, device=DEV).to(dtype).requires_grad_()
    yq, yk = apply_rotary_qk(q, k, cos, sin, backend="triton")
    dq, dk = torch.randn_like(yq), torch.randn_like(yk)
    torch.autograd.backward((yq, yk), (dq, dk))
    q64, k64 = to64(q, k)
    yq64, yk64 = apply_rotary_qk(q64, k64, cos.double(), sin.double(), backend="torch")
    torch.autograd.backward((yq64, yk64), (dq.double(), dk.double()))
    for name, a, b in (("q", yq, yq64), ("k", yk, yk64), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad)):
        assert_close64(a, b, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("config", rotary_module._CONFIGS, ids=str)
@pytest.mark.parametrize("t_rows, hq, hk, d", [(13, 3, 2, 80), (6, 7, 3, 128)], ids=str)
def test_every_launch_config_matches_reference(monkeypatch, t_rows, hq, hk, d, config, dtype):
    """Each candidate the launch tuner may pick (tokens per program, warps): token counts that fill no token
    block, q and k head blocks, both directions."""
    monkeypatch.setattr(rotary_module, "_CONFIGS", (config,))
    monkeypatch.setattr(tune_module, "_PICKED", {})
    _check_qk_against_float64(t_rows, hq, hk, d, dtype)


def test_fused_qk_with_unused_k_output():
    cos, sin = (t.to(DEV) for t in _mrope_inputs(5, 16))
    q = torch.randn(5, 2, 16, device=DEV, requires_grad=True)
    k = torch.randn(5, 1, 16, device=DEV, requires_grad=True)
    yq, _ = apply_rotary_qk(q, k, cos, sin, backend="triton")
    yq.sum().backward()
    assert_close64(q.grad, _grad_of_sum(q, cos, sin), torch.float32, "dq")
    assert k.grad is None or torch.count_nonzero(k.grad) == 0


def _grad_of_sum(x, cos, sin):
    (x64,) = to64(x)
    apply_rotary_ref(x64, cos.double(), sin.double()).sum().backward()
    return x64.grad


def test_triton_on_a_view_of_fused_qkv():
    t_rows, heads, head_dim = 11, 4, 80
    qkv = torch.randn(t_rows, 3 * heads, head_dim, device=DEV, requires_grad=True)
    q = qkv[:, heads: 2 * heads]  # row stride 3*heads*head_dim: exercised without a copy
    cos, sin = (t.to(DEV) for t in _mrope_inputs(t_rows, head_dim))
    y = apply_rotary(q, cos, sin, backend="triton")
    y.sum().backward()
    y64 = apply_rotary_ref(q.detach().double(), cos.double(), sin.double())
    assert_close64(y, y64, torch.float32, "y")
    assert torch.count_nonzero(qkv.grad[:, :heads]) == 0 and torch.count_nonzero(qkv.grad[:, heads: 2 * heads]) > 0


def test_reference_gradcheck():
    x = torch.randn(3, 2, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: apply_rotary_ref(t, cos, sin), (x,))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs(backend):
    with pytest.raises(ValueError, match="even head_dim"):
        apply_rotary(torch.randn(3, 2, 7), torch.randn(3, 7), torch.randn(3, 7), backend=backend)
    with pytest.raises(ValueError, match="cos/sin must be"):
        apply_rotary(torch.randn(3, 2, 8), torch.randn(4, 8), torch.randn(4, 8), backend=backend)
    with pytest.raises(ValueError, match="mrope_section"):
        mrope_cos_sin(torch.zeros(3, 5, dtype=torch.int64), rope_inv_freq(128), [16, 24, 23])
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        vision_rope_cos_sin(torch.zeros(5, 3, dtype=torch.int64), rope_inv_freq(40))


def test_triton_refuses_differentiable_cos():
    cos = torch.randn(3, 8, requires_grad=True)
    with pytest.raises(ValueError, match="does not differentiate cos/sin"):
        apply_rotary(torch.randn(3, 2, 8), cos, torch.randn(3, 8), backend="triton")


def _assert_bf16_rule(t_rows, heads, head_dim):
    """Triton bf16 output and gradient within the design.md bf16 rule (vs HF's bf16 LLM path, both against
    float64)."""
    cos, sin = (t.cuda() for t in _mrope_inputs(t_rows, head_dim))
    x = torch.randn(t_rows, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = apply_rotary(x, cos, sin, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    xt = x.detach().clone().requires_grad_()
    # HF's LLM path: cos/sin cast to the activation dtype, products in bf16
    cb, sb = cos.bfloat16()[:, None], sin.bfloat16()[:, None]
    yt = xt * cb + hf.rotate_half(xt) * sb
    yt.backward(dy)
    (x64,) = to64(x)
    y64 = apply_rotary_ref(x64, cos.double(), sin.double())
    y64.backward(dy.double())
    assert_bf16_rule(y, yt, y64, "y")
    assert_bf16_rule(x.grad, xt.grad, x64.grad, "dx")


@pytest.mark.gpu
@pytest.mark.parametrize("heads, head_dim", [(28, 128), (16, 80)])
def test_bf16_rule_on_gpu(heads, head_dim):
    _assert_bf16_rule(4099, heads, head_dim)


@pytest.mark.gpu
def test_every_launch_config_on_gpu(monkeypatch):
    """Each launch candidate compiled for the GPU, forced in turn, at both model head dims, forward and backward;
    1027 tokens fill no block of 2 or 4."""
    for config in rotary_module._CONFIGS:
        monkeypatch.setattr(rotary_module, "_CONFIGS", (config,))
        monkeypatch.setattr(tune_module, "_PICKED", {})
        for heads, head_dim in ((28, 128), (16, 80)):
            _assert_bf16_rule(1027, heads, head_dim)
