"""fused_reward_loss / reward_scores: Triton (interpreter on CPU) vs the float64 reference, the reference vs a stock
HF-style path, gradcheck, bad inputs, the sequence-parallel gather (2 gloo processes), and bf16 / CUDA on GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import vlr_kernels.reward_loss as rl
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm
from vlr_kernels import (
    BackendUnavailable,
    fused_reward_loss,
    fused_reward_loss_ref,
    reward_scores,
    rms_norm_ref,
)
from vlr_kernels.reward_loss import ZERO_IN_FORWARD_ENV

from tests.kernels.helpers import assert_bf16_rule, assert_close64, to64
from tests.kernels.reward_helpers import reward_inputs, sp_worker
from tests.ports import free_port

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _many_pairs(s, p, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < p:
        c, r = torch.randint(0, s, (2,), generator=g).tolist()
        if c != r:
            out.append([c, r])
    return out


CASES = {
    # id: (T, H, S, pairs, norm, margin, center, bias_shape)
    "h80_two_pairs_norm_margin_center": (37, 80, 4, [[0, 1], [2, 3]], True, True, 0.1, ()),
    "h80_one_pair_prenormed": (19, 80, 2, [[1, 0]], False, False, 0.0, (1,)),
    "k_rejected_1v3": (29, 96, 4, [[0, 1], [0, 2], [0, 3]], True, False, 0.0, ()),
    "h3584_block_tail": (9, 3584, 4, [[0, 1], [3, 2]], True, True, 0.01, ()),
    "h173_many_pairs": (301, 173, 40, _many_pairs(40, 70), True, True, 0.05, (1,)),
    # the sequence-parallel layout (gather_scored_rows): every row is scored, no row gets zeros
    "all_rows_scored": (6, 40, 6, [[0, 1], [2, 3], [4, 5], [0, 3]], True, True, 0.1, ()),
}


def _run_case(case, dtype):
    """One triton fwd+bwd of ``CASES[case]``: ``(inputs, (loss, rewards, acc), drewards)``, grads on the inputs."""
    t_rows, h, s, pairs, norm, margin, center, bias_shape = CASES[case]
    inputs = reward_inputs(t_rows, h, s, pairs, dtype, norm, margin, bias_shape)
    hidden, scored, pairs_t, w, b, nw, m = inputs
    loss, rewards, acc = fused_reward_loss(hidden, scored, pairs_t, w, b, nw, 1e-6, m, center, backend="triton")
    # a downstream use of the rewards output checks that its gradient path is wired too
    drew = torch.linspace(-1, 1, s, device=hidden.device)
    (loss + (rewards * drew).sum()).backward()
    return inputs, (loss, rewards, acc), drew


def _check_case_against_float64(case, dtype, inputs, outputs, drew):
    t_rows, _, _, _, _, _, center, _ = CASES[case]
    hidden, scored, pairs_t, w, b, nw, m = inputs
    loss, rewards, acc = outputs
    h64, w64, b64, nw64 = to64(hidden, w, b, nw)
    loss64, rewards64, acc64 = fused_reward_loss_ref(
        h64, scored, pairs_t, w64, b64, nw64, 1e-6, None if m is None else m.double(), center
    )
    (loss64 + (rewards64 * drew.double()).sum()).backward()

    assert rewards.dtype == torch.float32 and loss.dtype == torch.float32 and acc.dtype == torch.float32
    assert_close64(loss, loss64, dtype, "loss")
    assert_close64(rewards, rewards64, dtype, "rewards")
    assert acc.item() == acc64.item()
    assert_close64(hidden.grad, h64.grad, dtype, "dhidden")
    assert_close64(w.grad, w64.grad, dtype, "dhead_weight", scale=4)
    assert_close64(b.grad, b64.grad, dtype, "dhead_bias")
    assert b.grad.shape == b.shape
    if nw is not None:
        assert_close64(nw.grad, nw64.grad, dtype, "dnorm_weight", scale=4)
    unscored = torch.ones(t_rows, dtype=torch.bool, device=hidden.device)
    unscored[scored] = False
    assert torch.count_nonzero(hidden.grad[unscored]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_triton_matches_float64_reference(case, dtype, monkeypatch):
    monkeypatch.delenv(ZERO_IN_FORWARD_ENV, raising=False)
    _check_case_against_float64(case, dtype, *_run_case(case, dtype))


def _nan_filled_empty(monkeypatch) -> list[tuple[int, ...]]:
    """Make every floating ``torch.empty`` come back filled with NaN (garbage a kernel must overwrite); returns the
    list the shapes of those allocations are appended to."""
    shapes, real_empty = [], torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            shapes.append(tuple(t.shape))
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)
    return shapes


@pytest.mark.parametrize("mode", ["1", "stream"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_zero_in_forward_mode_matches_reference_and_mode_off(case, dtype, mode, monkeypatch):
    """VLR_REWARD_ZERO_IN_FORWARD=1 or stream: the forward allocates the gradient (filled with NaN here, every
    ``empty`` is) and has it zeroed; outputs and every gradient equal the float64 reference and, bit for bit, the
    default mode's."""
    shapes = _nan_filled_empty(monkeypatch)
    monkeypatch.setenv(ZERO_IN_FORWARD_ENV, "0")
    _, outputs_off, _ = inputs_off = _run_case(case, dtype)
    grads_off = [t.grad for t in inputs_off[0] if t is not None and t.requires_grad]
    shapes.clear()
    monkeypatch.setenv(ZERO_IN_FORWARD_ENV, mode)
    inputs, outputs, drew = _run_case(case, dtype)
    t_rows, h = CASES[case][:2]
    assert shapes.count((t_rows, h)) == 1, shapes  # the one gradient buffer, NaN-filled before the forward zeroed it
    _check_case_against_float64(case, dtype, inputs, outputs, drew)
    grads = [t.grad for t in inputs if t is not None and t.requires_grad]
    assert len(grads) == len(grads_off)
    for on, off in zip((*outputs, *grads), (*outputs_off, *grads_off)):
        assert torch.equal(on, off)


@pytest.mark.parametrize("mode", ["1", "stream"])
def test_zero_in_forward_mode_backward_twice(mode, monkeypatch):
    """retain_graph: the second backward reuses the buffer the forward zeroed (autograd copied the first gradient
    out, as the saved buffer is still referenced), so the accumulated gradient is exactly twice the first."""
    hidden, scored, pairs, w, b, nw, m = reward_inputs(37, 80, 4, [[0, 1], [2, 3]], torch.float32, True, True)
    monkeypatch.setenv(ZERO_IN_FORWARD_ENV, mode)
    loss, _, _ = fused_reward_loss(hidden, scored, pairs, w, b, nw, 1e-6, m, 0.1, backend="triton")
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in (hidden, w, b, nw)]
    loss.backward()
    for t, g in zip((hidden, w, b, nw), first):
        torch.testing.assert_close(t.grad, 2 * g, rtol=0, atol=0)


def test_zero_in_forward_env_values(monkeypatch):
    """A bad value is an error; the cuda backend refuses either mode (checked before its ops load); the torch
    reference ignores them."""
    hidden, scored, pairs, w, b, nw, m = reward_inputs(12, 8, 2, [[0, 1]], torch.float32, True, True)
    args = (hidden, scored, pairs, w, b, nw, 1e-6, m)
    for bad in ("yes", "2", "Stream"):
        monkeypatch.setenv(ZERO_IN_FORWARD_ENV, bad)
        with pytest.raises(ValueError, match="must be 0, 1 or stream"):
            fused_reward_loss(*args, backend="triton")
    expected = fused_reward_loss_ref(*args)[0]
    for mode in ("1", "stream"):
        monkeypatch.setenv(ZERO_IN_FORWARD_ENV, mode)
        torch.testing.assert_close(fused_reward_loss(*args, backend="torch")[0], expected)
        with monkeypatch.context() as m_ctx:
            m_ctx.setattr(rl, "resolve_backend", lambda *a, **k: "cuda")
            with pytest.raises(ValueError, match=f"{ZERO_IN_FORWARD_ENV}={mode} is a triton-backend mode"):
                fused_reward_loss(*args)


def test_reward_scores_and_strided_hidden():
    hidden, scored, _, w, b, nw, _ = reward_inputs(23, 80, 5, [[0, 1]], torch.float32, True, False)
    wide = torch.randn(23, 200, device=hidden.device)
    wide[:, 7:87] = hidden.detach()
    strided = wide[:, 7:87]  # row stride 200: the kernel must use the row stride, not H
    h64, w64, b64, nw64 = to64(hidden, w, b, nw)
    ref = fused_reward_loss_ref(h64, scored, torch.tensor([[0, 1]], device=hidden.device), w64, b64, nw64)[1]
    for h in (hidden, strided):
        r = reward_scores(h, scored, w, b, nw, backend="triton")
        assert not r.requires_grad
        assert_close64(r, ref, torch.float32, "reward_scores")
    assert_close64(reward_scores(hidden, scored, w, b, nw, backend="torch"), ref, torch.float32, "ref scores")


def test_strided_hidden_fwd_bwd():
    """hidden with row stride 200 != H: the kernels read with the stride, the gradient lands in the right columns of
    the underlying buffer (and zeros everywhere else)."""
    hidden, scored, pairs, w, b, nw, m = reward_inputs(23, 80, 5, [[0, 1], [2, 4], [3, 1]], torch.float32, True, True)
    wide = torch.randn(23, 200)
    wide[:, 7:87] = hidden.detach()
    wide.requires_grad_()
    loss, _, _ = fused_reward_loss(wide[:, 7:87], scored, pairs, w, b, nw, 1e-6, m, 0.1, backend="triton")
    loss.backward()
    h64, w64, b64, nw64 = to64(hidden, w, b, nw)
    loss64 = fused_reward_loss_ref(h64, scored, pairs, w64, b64, nw64, 1e-6, m.double(), 0.1)[0]
    loss64.backward()
    assert_close64(loss, loss64, torch.float32, "loss")
    assert_close64(wide.grad[:, 7:87], h64.grad, torch.float32, "dhidden")
    assert torch.count_nonzero(wide.grad[:, :7]) == 0 and torch.count_nonzero(wide.grad[:, 87:]) == 0
    assert_close64(w.grad, w64.grad, torch.float32, "dhead_weight", scale=4)


def test_reference_matches_hf_style_full_path():
    """The reference (gather, then norm + head) equals the peers' path: RMSNorm module on all tokens, linear head on
    all tokens, gather, -logsigmoid - all in float64."""
    t_rows, h = 31, 48
    hidden, scored, pairs, w, b, nw, m = reward_inputs(t_rows, h, 6, [[0, 1], [2, 3], [4, 5], [0, 5]], torch.float64,
                                                 True, True, bias_shape=(1,), device="cpu")
    norm = Qwen2_5_VLRMSNorm(h, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(nw)
    all_rewards = F.linear(norm(hidden), w[None], b).squeeze(-1)
    r = all_rewards[scored]
    expected = -F.logsigmoid(r[pairs[:, 0]] - r[pairs[:, 1]] - m).mean() + 0.1 * r.pow(2).mean()
    loss, rewards, acc = fused_reward_loss(hidden, scored, pairs, w, b, nw, 1e-6, m, 0.1, backend="torch")
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(rewards, r)
    assert acc.item() == (r[pairs[:, 0]] > r[pairs[:, 1]]).double().mean().item()


def test_reference_gradcheck():
    hidden, scored, pairs, w, b, nw, m = reward_inputs(11, 6, 4, [[0, 1], [0, 2], [3, 1]], torch.float64, True, True,
                                                 device="cpu")

    def f(hh, ww, bb, gg):
        loss, rewards, _ = fused_reward_loss_ref(hh, scored, pairs, ww, bb, gg, 1e-6, m, 0.3)
        return loss, rewards

    assert torch.autograd.gradcheck(f, (hidden, w, b, nw))


def test_stable_log_sigmoid_for_large_margins():
    hidden, scored, pairs, w, b, _, _ = reward_inputs(8, 16, 2, [[0, 1]], torch.float32, False, False)
    with torch.no_grad():
        w.fill_(0)
        b.fill_(0)
    for margin, expected in ((-200.0, 0.0), (200.0, 200.0)):
        m = torch.tensor([margin], device=hidden.device)
        loss, _, _ = fused_reward_loss(hidden, scored, pairs, w, b, None, 1e-6, m, backend="triton")
        assert torch.isfinite(loss) and abs(loss.item() - expected) < 1e-4


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(hidden=a["hidden"][0]), "hidden must be"),
        (lambda a: a.update(scored_index=a["scored_index"].int()), "scored_index must be"),
        (lambda a: a.update(scored_index=a["scored_index"][:0]), "empty"),
        (lambda a: a.update(scored_index=torch.tensor([0, 99])), ">= T"),
        (lambda a: a.update(scored_index=torch.tensor([-1, 4])), "< 0"),
        (lambda a: a.update(scored_index=torch.tensor([3, 3])), "duplicate"),
        (lambda a: a.update(pair_index=torch.tensor([[0, 2]])), ">= S"),
        (lambda a: a.update(pair_index=torch.tensor([[0, -1]])), "< 0"),
        (lambda a: a.update(pair_index=torch.zeros(0, 2, dtype=torch.int64)), "at least one pair"),
        (lambda a: a.update(pair_index=torch.tensor([0, 1])), "pair_index must be"),
        (lambda a: a.update(head_weight=torch.ones(5)), "head_weight must be"),
        (lambda a: a.update(head_bias=torch.zeros(2)), "head_bias must be"),
        (lambda a: a.update(norm_weight=torch.ones(3)), "norm_weight must be"),
        (lambda a: a.update(margin=torch.zeros(3)), "margin must be"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs_raise(mutate, message, backend):
    args = {"hidden": torch.randn(10, 8), "scored_index": torch.tensor([1, 4]), "pair_index": torch.tensor([[0, 1]]),
            "head_weight": torch.randn(8), "head_bias": torch.zeros(()), "norm_weight": None, "margin": None}
    mutate(args)
    with pytest.raises(ValueError, match=message):
        fused_reward_loss(**args, backend=backend)


def test_backend_errors(monkeypatch):
    args = (torch.randn(4, 8), torch.tensor([0, 1]), torch.tensor([[0, 1]]), torch.randn(8), torch.zeros(()))
    with pytest.raises(BackendUnavailable, match="needs CUDA tensors"):
        fused_reward_loss(*args, backend="cuda")
    with pytest.raises(BackendUnavailable, match="not one of"):
        fused_reward_loss(*args, backend="liger")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        fused_reward_loss(*args, backend="triton")


@pytest.mark.timeout(120)
def test_sequence_parallel_gather_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    path = str(tmp_path / "sp")
    ctx = mp.start_processes(sp_worker, args=(2, free_port(), path), nprocs=2, join=False, start_method="spawn")
    while not ctx.join(timeout=90):
        pass
    hidden, scored, pairs, w, b, nw, m = reward_inputs(
        23, 40, 6, [[0, 1], [2, 3], [4, 5], [0, 3]], torch.float64, True, True, device="cpu"
    )
    loss, _, _ = fused_reward_loss_ref(hidden, scored, pairs, w, b, nw, 1e-6, m, 0.1)
    loss.backward()
    parts = [torch.load(f"{path}.{r}") for r in range(2)]
    torch.testing.assert_close(torch.cat([parts[0]["dlocal"], parts[1]["dlocal"]]), hidden.grad)
    for p in parts:
        torch.testing.assert_close(p["loss"], loss.detach())
        torch.testing.assert_close(p["dw"], w.grad)
        torch.testing.assert_close(p["dg"], nw.grad)


def _hf_style_bf16(hidden, scored, pairs, w, b, nw, m, center):
    """What a peer computes in bf16: HF RMSNorm (fp32 statistics, bf16 result), bf16 linear head, then the loss."""
    rows = hidden[scored]
    if nw is not None:
        rows = rms_norm_ref(rows, nw)
    r = (rows @ w + b.reshape(())).float()
    d = r[pairs[:, 0]] - r[pairs[:, 1]] - m
    return -F.logsigmoid(d).mean() + center * r.pow(2).mean(), r


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("norm", [True, False])
def test_bf16_rule_on_gpu(backend, norm):
    if backend == "cuda":
        pytest.importorskip("vlr_kernels._cuda", reason="CUDA extension not built (pip install --no-build-isolation -e .)")
    t_rows, h = 4096, 3584
    pairs = [[2 * i, 2 * i + 1] for i in range(16)] + [[0, 5], [0, 7]]
    hidden, scored, pairs_t, w, b, nw, m = reward_inputs(t_rows, h, 32, pairs, torch.bfloat16, norm, True)
    loss, rewards, _ = fused_reward_loss(hidden, scored, pairs_t, w, b, nw, 1e-6, m, 0.01, backend=backend)
    loss.backward()
    grads_k = [t.grad for t in (hidden, w, b, nw) if t is not None]
    for t in (hidden, w, b, nw):
        if t is not None:
            t.grad = None
    loss_t, rewards_t = _hf_style_bf16(hidden, scored, pairs_t, w, b, nw, m, 0.01)
    loss_t.backward()
    grads_t = [t.grad for t in (hidden, w, b, nw) if t is not None]
    ins64 = to64(hidden, w, b, nw)
    loss64, rewards64, _ = fused_reward_loss_ref(ins64[0], scored, pairs_t, *ins64[1:3], ins64[3], 1e-6,
                                                 m.double(), 0.01)
    loss64.backward()
    grads64 = [t.grad for t in ins64 if t is not None]
    assert_bf16_rule(loss, loss_t, loss64, "loss")
    assert_bf16_rule(rewards, rewards_t, rewards64, "rewards")
    for name, gk, gt, g64 in zip(("dhidden", "dw", "db", "dnorm"), grads_k, grads_t, grads64):
        assert_bf16_rule(gk, gt, g64, name)


@pytest.mark.gpu
def test_cuda_ops_trace_under_torch_compile():
    """The torch.library registration + fake implementations let torch.compile capture the CUDA backend."""
    pytest.importorskip("vlr_kernels._cuda", reason="CUDA extension not built (pip install --no-build-isolation -e .)")
    hidden, scored, pairs, w, b, nw, m = reward_inputs(333, 3584, 8, [[0, 1], [2, 3], [4, 5], [6, 7]], torch.bfloat16,
                                                 True, True)

    def f(hh):
        return fused_reward_loss(hh, scored, pairs, w, b, nw, 1e-6, m, 0.0, backend="cuda", check_indices=False)[0]

    eager = f(hidden)
    compiled = torch.compile(f, fullgraph=True)(hidden)
    torch.testing.assert_close(compiled, eager)
    (g_eager,) = torch.autograd.grad(eager, hidden)
    (g_comp,) = torch.autograd.grad(torch.compile(f, fullgraph=True)(hidden), hidden)
    torch.testing.assert_close(g_comp, g_eager)
