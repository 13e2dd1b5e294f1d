"""The fused mixed-precision AdamW kernel against torch.optim.AdamW and a float64 reference (CPU through the Triton
interpreter: fp32 and fp16; bf16 on the GPU), MasterAdamW's fused path against its torch path, resume through a
state_dict, and the benchmark's --quick mode."""

from __future__ import annotations

import copy
import csv

import pytest
import torch
from torch import nn
from vlr_kernels import BackendUnavailable, adamw_step, adamw_step_ref

from tests.runtime.helpers import run_quick_benchmark
from vlr_runtime.config import OptimConfig
from vlr_runtime.training.optim import MasterAdamW, clip_factor, clip_gradients

HP = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}


def _scale(kind: str, value: float, device: torch.device) -> float | torch.Tensor:
    return torch.tensor(value, device=device) if kind == "tensor" else value


# (shape, 16-bit parameter dtype or None for an fp32 parameter, weight decay, grad_scale kind and value, first step)
CASES = [
    ((37, 29), None, 0.0, ("float", 1.0), 0),
    ((1031,), None, 0.1, ("float", 0.37), 999),
    ((37, 29), torch.float16, 0.1, ("tensor", 0.37), 0),
    ((1031,), torch.float16, 0.0, ("tensor", 2.5), 999),
]


def _assert_fp32_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    """Equal to a few fp32 ulps of the tensor's largest value: torch's CPU AdamW forms m with lerp, the kernel
    with b1 * m + (1 - b1) * g (as torch's CUDA kernel does), and the rounding differences carry through."""
    atol = 1e-6 * theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("shape,param_dtype,weight_decay,scale,first_step", CASES)
def test_kernel_matches_torch_adamw_and_float64(shape, param_dtype, weight_decay, scale, first_step):
    """Three steps on sizes that are not multiples of the block; from zero state or from step 999 with moments
    (bias corrections at large step counts). torch.optim.AdamW updates an fp32 copy with the scaled gradient."""
    gen = torch.Generator().manual_seed(0)
    master = torch.randn(shape, generator=gen)
    exp_avg = torch.randn(shape, generator=gen) * 0.1 if first_step else torch.zeros(shape)
    exp_avg_sq = torch.rand(shape, generator=gen) * 0.01 if first_step else torch.zeros(shape)
    step = torch.tensor(float(first_step))
    param = master.to(param_dtype) if param_dtype else None
    grad_dtype = param_dtype or torch.float32
    grad_scale = _scale(*scale, master.device)

    ref = nn.Parameter(master.clone())
    opt = torch.optim.AdamW([ref], lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                            weight_decay=weight_decay)
    opt.state[ref] = {"step": step.clone(), "exp_avg": exp_avg.clone(), "exp_avg_sq": exp_avg_sq.clone()}
    ref64 = [t.double() for t in (master, exp_avg, exp_avg_sq)]
    for _ in range(3):
        grad = (torch.randn(shape, generator=gen) * 3).to(grad_dtype)
        saved = grad.clone()
        step += 1
        adamw_step(master, grad, exp_avg, exp_avg_sq, step, **HP, weight_decay=weight_decay, grad_scale=grad_scale,
                   param=param, backend="triton")
        assert torch.equal(grad, saved), "the kernel wrote to the gradient"
        adamw_step_ref(ref64[0], grad.double(), ref64[1], ref64[2], step, **HP, weight_decay=weight_decay,
                       grad_scale=float(grad_scale))
        ref.grad = grad.float() * grad_scale
        opt.step()

    assert float(step) == first_step + 3  # the caller counts steps; the kernel only reads the count
    state = opt.state[ref]
    for name, ours, theirs, exact in (("master", master, ref.detach(), ref64[0]),
                                      ("exp_avg", exp_avg, state["exp_avg"], ref64[1]),
                                      ("exp_avg_sq", exp_avg_sq, state["exp_avg_sq"], ref64[2])):
        _assert_fp32_close(ours, theirs, name)
        err_ours = (ours.double() - exact).abs().max().item()
        err_torch = (theirs.double() - exact).abs().max().item()
        assert err_ours <= 2 * err_torch + 1e-7, f"{name}: error {err_ours:.3e} vs torch fp32 {err_torch:.3e}"
    if param is not None:
        assert torch.equal(param, master.to(param_dtype)), "the 16-bit parameter is not the rounded master"


def test_kernel_rejects_bad_inputs():
    m, g = torch.zeros(4, 6), torch.zeros(4, 6, dtype=torch.float16)
    step = torch.ones(())

    def call(**over):
        args = dict(master=m, grad=g, exp_avg=torch.zeros(4, 6), exp_avg_sq=torch.zeros(4, 6), step=step, **HP)
        args.update(over)
        adamw_step(**args, backend="triton")

    with pytest.raises(ValueError, match="grad .* does not match"):
        call(grad=torch.zeros(6, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="exp_avg must be contiguous"):
        call(exp_avg=torch.zeros(6, 4).t())
    with pytest.raises(ValueError, match="triton backend updates fp32 masters"):
        call(master=m.double(), exp_avg=torch.zeros(4, 6, dtype=torch.float64),
             exp_avg_sq=torch.zeros(4, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="separate bf16/fp16 copy"):
        call(param=m)
    with pytest.raises(ValueError, match="step must be a one-element float"):
        call(step=torch.ones(2))
    with pytest.raises(ValueError, match="grad_scale must be one fp32 element"):
        call(grad_scale=torch.tensor(0.5, dtype=torch.float64))


def _params(device: torch.device, dtype16: torch.dtype) -> list[nn.Parameter]:
    """A 16-bit matrix (decayed), a 16-bit vector (not decayed) and an fp32 matrix (updated in place)."""
    gen = torch.Generator().manual_seed(1)
    return [nn.Parameter(torch.randn(shape, generator=gen).to(device, dtype))
            for shape, dtype in (((13, 77), dtype16), ((11,), dtype16), ((5, 9), torch.float32))]


def _train(opt: MasterAdamW, params: list[nn.Parameter], scales: list, first: int = 0) -> None:
    """Steps ``first, first + 1, ...`` (one per entry of ``scales``), step ``i`` with gradients drawn from seed
    ``i``; the vector gets no gradient at step 1 (its state must not advance). Checks that no path modifies a
    gradient."""
    for i, scale in enumerate(scales, start=first):
        gen = torch.Generator().manual_seed(i)
        grads = [torch.randn(p.shape, generator=gen).to(p.device, p.dtype) for p in params]
        for j, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if (i == 1 and j == 1) else g.clone()
        opt.step(grad_scale=scale)
        for p, g in zip(params, grads):
            assert p.grad is None or torch.equal(p.grad, g), "the optimizer step modified a gradient"
        opt.zero_grad()


def _state_of(opt: MasterAdamW) -> list[dict[str, torch.Tensor]]:
    return [opt.optimizer.state[m] for m in opt.masters]


def test_master_adamw_fused_path_matches_torch_path():
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.98)
    results = {}
    for fused in (False, True):
        params = _params(torch.device("cpu"), torch.float16)
        opt = MasterAdamW(params, cfg, fused=fused)
        assert opt.fused is fused
        _train(opt, params, [1.0, 0.5, torch.tensor(0.25)])
        results[fused] = params, opt
    (p_t, opt_t), (p_f, opt_f) = results[False], results[True]
    for i, (mt, mf) in enumerate(zip(opt_t.masters, opt_f.masters)):
        _assert_fp32_close(mf, mt, f"master {i}")
    for st, sf in zip(_state_of(opt_t), _state_of(opt_f)):
        assert st.keys() == sf.keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert torch.equal(st["step"], sf["step"]) and st["step"].dtype == sf["step"].dtype
        for k in ("exp_avg", "exp_avg_sq"):
            _assert_fp32_close(sf[k], st[k], k)
    assert [float(s["step"]) for s in _state_of(opt_f)] == [3.0, 2.0, 3.0]
    for params, opt in ((p_t, opt_t), (p_f, opt_f)):
        assert all(torch.equal(params[i], opt.masters[i].half()) for i in (0, 1))
    assert opt_f.masters[2] is p_f[2]


def test_master_adamw_fused_resume_through_state_dict_is_exact():
    """3 steps, checkpoint (optimizer state_dict + masters + parameters), a fresh optimizer resumes for 2 more:
    identical to 5 uninterrupted steps. Also resumable by the torch path (same format)."""
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    scales = [1.0, 0.5, torch.tensor(0.25), 0.8, torch.tensor(1.0)]
    full_params = _params(torch.device("cpu"), torch.float16)
    full = MasterAdamW(full_params, cfg, fused=True)
    _train(full, full_params, scales)

    first_params = _params(torch.device("cpu"), torch.float16)
    first = MasterAdamW(first_params, cfg, fused=True)
    _train(first, first_params, scales[:3])
    saved = copy.deepcopy(first.optimizer.state_dict())
    saved_masters = [m.detach().clone() for m in first.master_copies()]
    for fused in (True, False):
        params = [nn.Parameter(p.detach().clone()) for p in first_params]
        resumed = MasterAdamW(params, cfg, fused=fused)
        resumed.optimizer.load_state_dict(copy.deepcopy(saved))
        for m, value in zip(resumed.master_copies(), saved_masters):
            m.detach().copy_(value)
        _train(resumed, params, scales[3:], first=3)
        for i, (a, b) in enumerate(zip(resumed.masters, full.masters)):
            if fused:
                assert torch.equal(a, b), f"master {i} differs after resume"
            else:
                _assert_fp32_close(a, b, f"master {i} (torch path resumed)")
        if fused:
            for sa, sb in zip(_state_of(resumed), _state_of(full)):
                assert all(torch.equal(sa[k], sb[k]) for k in sb)
            assert all(torch.equal(a, b) for a, b in zip(params, full_params))


def test_clip_factor_as_grad_scale_equals_clipping_in_place():
    """The factor clip_gradients applies, as a float or (from a device norm, no host sync) a 0-d fp32 tensor;
    MasterAdamW stepping with it equals clipping in place then stepping."""
    for norm, max_norm, expected in ((5.0, 1.0, 1.0 / (5.0 + 1e-6)), (0.5, 1.0, 1.0), (5.0, 0.0, 1.0)):
        assert clip_factor(norm, max_norm) == pytest.approx(expected, rel=1e-12)
        as_tensor = clip_factor(torch.tensor(norm, dtype=torch.float64), max_norm)
        assert float(as_tensor) == pytest.approx(expected, rel=1e-6)
        assert not torch.is_tensor(as_tensor) or (as_tensor.dtype == torch.float32 and as_tensor.ndim == 0)
    cfg = OptimConfig(lr=1e-2)
    clipped, scaled = _params(torch.device("cpu"), torch.float32), _params(torch.device("cpu"), torch.float32)
    for ps in (clipped, scaled):
        for p in ps:
            p.grad = torch.full_like(p, 3.0)
    clip_gradients(clipped, 4.0, 1.0)
    MasterAdamW(clipped, cfg).step()
    MasterAdamW(scaled, cfg).step(grad_scale=clip_factor(torch.tensor(4.0), 1.0))
    assert all(torch.equal(a, b) for a, b in zip(clipped, scaled))


def test_master_adamw_fused_needs_the_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        MasterAdamW(_params(torch.device("cpu"), torch.float16), OptimConfig(), fused=True)
    assert not MasterAdamW(_params(torch.device("cpu"), torch.float16), OptimConfig()).fused  # CPU: torch path


@pytest.mark.timeout(120)
def test_bench_adamw_quick(tmp_path):
    """``benchmarks/bench_adamw.py --quick`` times both providers (the kernel through the interpreter) and writes
    GB/s rows; a provider that failed would be a skip line, not a row."""
    out = tmp_path / "rows.csv"
    run_quick_benchmark("bench_adamw.py", out, 110, interpret=True)
    rows = list(csv.DictReader(out.open()))
    got = {(r["provider"], r["mode"], r["metric"]) for r in rows}
    assert {(p, "step", m) for p in ("torch", "ours") for m in ("ms", "GB/s", "pct_copy_bw")} <= got
    assert all(float(r["p50"]) > 0 for r in rows)


@pytest.mark.gpu
def test_fused_adamw_bf16_on_cuda_matches_torch_fused(monkeypatch):
    """bf16 parameters with fp32 masters: the kernel (default on CUDA) against today's path (torch's fused AdamW on
    fp32 gradient copies), both against a float64 run of the same updates; the step replays in a CUDA graph."""
    dev = torch.device("cuda")
    cfg = OptimConfig(lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.98)
    shapes = [(1000, 3001), (513,), (64, 7)]
    runs = {}
    for fused in (True, False):
        monkeypatch.setenv("VLR_FUSED_ADAMW", "1" if fused else "0")
        gen = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(s, generator=gen).to(dev, torch.bfloat16)) for s in shapes]
        opt = MasterAdamW(params, cfg)
        assert opt.fused is fused
        ref64 = [p.detach().double() for p in params]
        moments64 = [(torch.zeros_like(r), torch.zeros_like(r)) for r in ref64]
        for i in range(3):
            scale = torch.tensor(0.3, device=dev)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dev, torch.bfloat16)
            for p, r, (m, v) in zip(params, ref64, moments64):
                wd = cfg.weight_decay if p.ndim >= 2 else 0.0
                adamw_step_ref(r, p.grad.double(), m, v, torch.tensor(i + 1.0), lr=cfg.lr, beta1=cfg.beta1,
                               beta2=cfg.beta2, eps=cfg.eps, weight_decay=wd, grad_scale=0.3)
            opt.step(grad_scale=scale)
        runs[fused] = params, opt, ref64
    (p_k, opt_k, ref64), (p_t, opt_t, _) = runs[True], runs[False]
    for i, (mk, mt, r) in enumerate(zip(opt_k.masters, opt_t.masters, ref64)):
        err_k, err_t = (mk.double() - r).abs().max().item(), (mt.double() - r).abs().max().item()
        floor = 5e-7 * r.abs().max().item()  # ~4 fp32 ulps: torch's kernel does part of its math in float64
        assert err_k <= 2 * err_t + floor, f"master {i}: kernel error {err_k:.3e} vs torch fused {err_t:.3e}"
        assert torch.equal(p_k[i], mk.to(torch.bfloat16))
        differ = (p_k[i] != p_t[i]).float().mean().item()
        assert differ < 1e-3, f"param {i}: {differ:.2%} of bf16 values differ from torch's fused path"

    # no host synchronisation in the step: it captures and replays like the eager step
    twin = [nn.Parameter(p.detach().clone()) for p in p_k]
    opt_twin = MasterAdamW(twin, cfg, fused=True)
    opt_twin.optimizer.load_state_dict(copy.deepcopy(opt_k.optimizer.state_dict()))
    for a, b in zip(opt_twin.master_copies(), opt_k.master_copies()):
        a.detach().copy_(b)
    scale = torch.tensor(0.5, device=dev)
    for p, q in zip(p_k, twin):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_k.step(grad_scale=scale)
    graph.replay()
    opt_twin.step(grad_scale=scale)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(opt_k.masters, opt_twin.masters))
    assert all(torch.equal(a, b) for a, b in zip(p_k, twin))
