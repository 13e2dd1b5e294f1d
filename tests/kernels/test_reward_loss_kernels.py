"""fused_reward_loss's device work: which kernels one fwd+bwd launches, what it allocates, and that the one-kernel
backward writes every row of a gradient buffer whose memory was dirty (Triton through the interpreter on CPU; the same
on a GPU for both backends); the same for the opt-in zero-in-forward modes (VLR_REWARD_ZERO_IN_FORWARD=1 / stream)."""

from __future__ import annotations

import pytest
import torch
import vlr_kernels.reward_loss as rl
import vlr_kernels.reward_loss_triton as rlt
from torch.utils._python_dispatch import TorchDispatchMode
from vlr_kernels import fused_reward_loss, fused_reward_loss_ref, reward_scores
from vlr_kernels.reward_loss import ZERO_IN_FORWARD_ENV

from tests.kernels.helpers import assert_close64, to64
from tests.kernels.reward_helpers import reward_inputs
from tests.kernels.test_reward_loss import _many_pairs

# aten ops that allocate, alias or describe a tensor: no device kernel. Any other op would be a launch on CUDA.
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "view", "_unsafe_view", "reshape", "detach",
             "alias", "as_strided", "expand", "t", "slice", "select", "unsqueeze", "squeeze"}
TRITON_KERNELS = ("_reward_fwd_kernel", "_reward_fwd_zero_kernel", "_zero_unscored_kernel", "_pair_loss_kernel",
                  "_reward_bwd_kernel")


class _Recorder(TorchDispatchMode):
    """Records (op name, numel of each fresh output) of the aten ops run outside Triton launches; launches are
    recorded by name. The interpreter's own copies of kernel arguments happen inside launches and are not counted."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list[int]]] = []
        self.launches: list[str] = []
        self.grids: list[tuple[int, ...]] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            self.ops.append((func.overloadpacket.__name__, [t.numel() for t in outs if isinstance(t, torch.Tensor)]))
        return out

    def take(self) -> tuple[list[str], list[tuple[str, list[int]]]]:
        launches, ops = self.launches, self.ops
        self.launches, self.ops = [], []
        return launches, ops

    def install(self, monkeypatch) -> None:
        """Wrap every Triton kernel of the op so its launches are recorded."""
        for name in TRITON_KERNELS:
            monkeypatch.setattr(rlt, name, _CountedKernel(name, getattr(rlt, name), self))


class _CountedKernel:
    """Stands in for a Triton kernel object: ``kernel[grid](...)`` records the launch and pauses the recorder."""

    def __init__(self, name: str, kernel, rec: _Recorder):
        self.name, self.kernel, self.rec = name, kernel, rec

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.rec.launches.append(self.name)
            self.rec.grids.append(tuple(grid))
            self.rec.paused = True
            try:
                return launch(*args, **kwargs)
            finally:
                self.rec.paused = False

        return run


def _record_fwd_bwd(monkeypatch, t_rows: int, h: int, s: int, check: bool):
    """One fused_reward_loss forward and backward (triton, norm + margin + centering) under a recorder:
    ``(recorder, hidden, scored_index, (forward launches, ops), (backward launches, ops))``."""
    hidden, scored, pairs, w, b, nw, m = reward_inputs(t_rows, h, s, [[0, 1], [2, 3], [0, 3]], torch.float32, True,
                                                       True)
    rec = _Recorder()
    rec.install(monkeypatch)
    seed = torch.ones(())  # made outside the recorder: not an op of ours
    with rec:
        loss, _, _ = fused_reward_loss(hidden, scored, pairs, w, b, nw, 1e-6, m, 0.1, backend="triton",
                                       check_indices=check)
        fwd = rec.take()
        torch.autograd.backward(loss, seed)
        bwd = rec.take()
    return rec, hidden, scored, fwd, bwd


@pytest.mark.parametrize("check", [False, True], ids=["unchecked", "checked"])
def test_fwd_bwd_is_three_launches_and_no_torch_compute(monkeypatch, check):
    """Forward: row kernel + pair kernel, no [T, H] allocation; backward: one kernel into an uninitialised
    gradient (``empty``, no fill). No torch op that would be a device kernel, except the index-check verdict (read on
    CPU as one ``_local_scalar_dense``; on CUDA it is one ``torch._assert_async``)."""
    t_rows, h = 41, 80
    monkeypatch.delenv(ZERO_IN_FORWARD_ENV, raising=False)
    _, hidden, _, (fwd_launches, fwd_ops), (bwd_launches, bwd_ops) = _record_fwd_bwd(monkeypatch, t_rows, h, 4,
                                                                                      check)
    assert fwd_launches == ["_reward_fwd_kernel", "_pair_loss_kernel"]
    assert bwd_launches == ["_reward_bwd_kernel"]
    compute = [name for name, _ in fwd_ops + bwd_ops if name not in NO_KERNEL]
    assert compute == (["_local_scalar_dense"] if check else []), compute
    assert max(n for _, sizes in fwd_ops for n in sizes) < t_rows * h, "the forward allocated a [T, H] buffer"
    big = [name for name, sizes in bwd_ops if t_rows * h in sizes]
    assert big[0] == "empty" and all(name in ("empty", "detach") for name in big), big
    assert hidden.grad.shape == (t_rows, h) and torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("mode", ["1", "stream"])
@pytest.mark.parametrize("check", [False, True], ids=["unchecked", "checked"])
def test_zero_in_forward_mode_launches_and_allocations(monkeypatch, check, mode):
    """Mode 1: the forward launches the row+zero kernel (S row programs, then one zero program per 8 rows of all
    T); mode stream: the zero programs for the unscored rows alone (on the side stream on CUDA; in place here), then
    the plain row kernel. Either allocates the one [T, H] buffer (``empty``, no fill) in the forward; the backward
    launches only the scored-column programs, allocates no [T, H] and hands that buffer to ``hidden.grad`` without
    a copy."""
    t_rows, h, s = 41, 80, 4
    monkeypatch.setenv(ZERO_IN_FORWARD_ENV, mode)
    rec, hidden, scored, (fwd_launches, fwd_ops), (bwd_launches, bwd_ops) = _record_fwd_bwd(monkeypatch, t_rows, h,
                                                                                             s, check)
    n_col_tiles, n_zero = -(-h // rlt._BWD_BLOCK_C), -(-t_rows // rlt._ZERO_ROWS)
    if mode == "1":
        assert fwd_launches == ["_reward_fwd_zero_kernel", "_pair_loss_kernel"]
        assert rec.grids == [(s + n_zero,), (1,), (n_col_tiles,)]
    else:
        assert fwd_launches == ["_zero_unscored_kernel", "_reward_fwd_kernel", "_pair_loss_kernel"]
        assert rec.grids == [(n_zero,), (s,), (1,), (n_col_tiles,)]
    assert bwd_launches == ["_reward_bwd_kernel"]
    compute = [name for name, _ in fwd_ops + bwd_ops if name not in NO_KERNEL]
    assert compute == (["_local_scalar_dense"] if check else []), compute  # a copy into hidden.grad would show
    assert [name for name, sizes in fwd_ops if t_rows * h in sizes] == ["empty"]
    assert all(name in ("detach", "alias") for name, sizes in bwd_ops if t_rows * h in sizes), bwd_ops
    unscored = torch.ones(t_rows, dtype=torch.bool)
    unscored[scored] = False
    assert torch.count_nonzero(hidden.grad[unscored]) == 0 and torch.count_nonzero(hidden.grad[scored]) > 0


@pytest.mark.parametrize("mode", ["1", "stream"])
@pytest.mark.parametrize("how", ["frozen_hidden", "no_grad", "reward_scores"])
def test_zero_in_forward_mode_without_hidden_grad_changes_nothing(monkeypatch, how, mode):
    """Mode on but no gradient for hidden: the plain row kernel (S programs), no [T, H] buffer in the forward."""
    t_rows, h, s = 41, 80, 4
    hidden, scored, pairs, w, b, nw, m = reward_inputs(t_rows, h, s, [[0, 1], [2, 3]], torch.float32, True, True)
    if how == "frozen_hidden":
        hidden = hidden.detach()
    monkeypatch.setenv(ZERO_IN_FORWARD_ENV, mode)
    rec = _Recorder()
    rec.install(monkeypatch)
    with rec:
        if how == "reward_scores":
            reward_scores(hidden, scored, w, b, nw, backend="triton")
        else:
            with torch.set_grad_enabled(how != "no_grad"):
                loss, _, _ = fused_reward_loss(hidden, scored, pairs, w, b, nw, 1e-6, m, backend="triton")
        launches, ops = rec.take()
    assert launches[0] == "_reward_fwd_kernel" and rec.grids[0] == (s,), (launches, rec.grids)
    assert max(n for _, sizes in ops for n in sizes) < t_rows * h, "a [T, H] buffer was allocated"
    if how == "frozen_hidden":  # the head still trains: the backward runs as without the mode
        loss.backward()
        assert w.grad is not None and rec.launches == ["_reward_bwd_kernel"]


@pytest.mark.parametrize("zeros_in", ["backward", "forward", "fill"])
def test_backward_writes_every_row_of_a_dirty_buffer(zeros_in):
    """The launchers alone, into a NaN-filled buffer: scored rows match float64, every other row is exactly zero.
    ``forward``: the zero-in-forward launch first zeroes every row (scored ones too), then the backward runs only
    its scored columns. ``fill``: the stream mode's fill (``zero_unscored``) zeroes exactly the unscored rows and
    leaves the scored ones alone (still NaN), then the backward runs only its scored columns. Shapes cross every block edge: T % 8 != 0 (zero rows), H > 512 and H % 64 != 0
    (zero/scored columns), S > 64 (index scans, scored-row tiles of 32, pair programs of 64), P > 64, plus a
    gradient on the rewards."""
    t_rows, h, s = 101, 600, 70
    pairs = _many_pairs(s, 80, seed=3)
    hidden, scored, pairs_t, w, b, nw, m = reward_inputs(t_rows, h, s, pairs, torch.float32, True, True)
    args = rl._kernel_inputs(hidden.detach(), scored, pairs_t, w.detach(), b.detach(), nw.detach(), m)
    h_k, scored_k, pairs_k, w_k, b_k, nw_k, m_k = args
    dirty = torch.full((t_rows, h), float("nan"))
    in_fwd = zeros_in == "forward"
    rewards, rstd, row_ok = rlt.reward_fwd(h_k, scored_k, w_k, b_k, nw_k, 1e-6, check=True,
                                           dhidden=dirty if in_fwd else None)
    if in_fwd:
        assert torch.equal(dirty, torch.zeros_like(dirty))
        assert torch.equal(rewards, rlt.reward_fwd(h_k, scored_k, w_k, b_k, nw_k, 1e-6, check=True)[0])
    if zeros_in == "fill":
        rlt.zero_unscored(dirty, scored_k)
        is_scored = torch.zeros(t_rows, dtype=torch.bool)
        is_scored[scored] = True
        assert dirty[is_scored].isnan().all() and torch.equal(dirty[~is_scored], torch.zeros_like(dirty[~is_scored]))
    loss, _, ok, coef = rlt.pair_loss_fwd(rewards, pairs_k, m_k, row_ok, 0.05, check=True)
    assert ok.item() == 1 and bool(row_ok.all())
    drewards = torch.linspace(-1, 1, s)
    dh, dw, db, dg = rlt.reward_loss_bwd(torch.tensor(0.5), drewards, h_k, scored_k, w_k, b_k, nw_k, rewards, rstd,
                                         coef, dhidden=dirty, unscored_zeroed=zeros_in != "backward")
    assert dh is dirty

    h64, w64, b64, nw64 = to64(hidden, w, b, nw)
    loss64, rewards64, _ = fused_reward_loss_ref(h64, scored, pairs_t, w64, b64, nw64, 1e-6, m.double(), 0.05)
    (0.5 * loss64 + (rewards64 * drewards.double()).sum()).backward()
    assert_close64(loss, loss64, torch.float32, "loss")
    unscored = torch.ones(t_rows, dtype=torch.bool)
    unscored[scored] = False
    assert torch.equal(dh[unscored], torch.zeros_like(dh[unscored]))
    assert_close64(dh, h64.grad, torch.float32, "dhidden")
    assert_close64(dw, w64.grad, torch.float32, "dhead_weight", scale=4)
    assert_close64(db.reshape(()), b64.grad, torch.float32, "dhead_bias", scale=4)
    assert_close64(dg, nw64.grad, torch.float32, "dnorm_weight", scale=4)


def test_backward_rejects_a_bad_gradient_buffer():
    hidden, scored, pairs, w, b, _, _ = reward_inputs(9, 16, 2, [[0, 1]], torch.float32, False, False)
    h_k, scored_k, pairs_k, w_k, b_k, _, _ = rl._kernel_inputs(hidden.detach(), scored, pairs, w.detach(),
                                                               b.detach(), None, None)
    rewards, rstd, row_ok = rlt.reward_fwd(h_k, scored_k, w_k, b_k, None, 1e-6)
    coef = rlt.pair_loss_fwd(rewards, pairs_k, None, row_ok, 0.0)[3]
    for bad in (torch.empty(9, 16).t().contiguous().t(), torch.empty(9, 15), torch.empty(9, 16, dtype=torch.float16)):
        with pytest.raises(ValueError, match="dhidden must be a contiguous"):
            rlt.reward_loss_bwd(torch.tensor(1.0), None, h_k, scored_k, w_k, b_k, None, rewards, rstd, coef,
                                dhidden=bad)
        with pytest.raises(ValueError, match="dhidden must be a contiguous"):
            rlt.reward_fwd(h_k, scored_k, w_k, b_k, None, 1e-6, dhidden=bad)
    with pytest.raises(ValueError, match="needs the dhidden buffer"):
        rlt.reward_loss_bwd(torch.tensor(1.0), None, h_k, scored_k, w_k, b_k, None, rewards, rstd, coef,
                            unscored_zeroed=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "triton_zero_fwd", "triton_zero_stream"])
@pytest.mark.parametrize("check", [False, True], ids=["unchecked", "checked"])
def test_gpu_kernels_memory_and_dirty_allocator(backend, check, monkeypatch):
    """On the device: the caching allocator hands the gradient a block just filled with NaN, yet every unscored row
    comes back zero; the forward allocates O(S) bytes (the gradient + O(S) with a zero-in-forward mode); fwd+bwd
    runs 3 kernels (4 with the stream mode's separate fill; +1 assertion with the checks)."""
    if backend == "cuda":
        pytest.importorskip("vlr_kernels._cuda", reason="CUDA extension not built (pip install --no-build-isolation -e .)")
    mode = {"triton_zero_fwd": "1", "triton_zero_stream": "stream"}.get(backend, "0")
    monkeypatch.setenv(ZERO_IN_FORWARD_ENV, mode)
    backend = "cuda" if backend == "cuda" else "triton"
    from torch.profiler import ProfilerActivity, profile

    t_rows, h = 4099, 3584
    pairs = [[2 * i, 2 * i + 1] for i in range(16)] + [[0, 5]]
    hidden, scored, pairs_t, w, b, nw, m = reward_inputs(t_rows, h, 32, pairs, torch.bfloat16, True, True)
    torch.full((t_rows, h), float("nan"), dtype=torch.bfloat16, device="cuda")  # freed at once, block stays cached
    seed = torch.ones((), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loss, _, _ = fused_reward_loss(hidden, scored, pairs_t, w, b, nw, 1e-6, m, 0.01, backend=backend,
                                       check_indices=check)
        torch.cuda.synchronize()
        fwd_peak = torch.cuda.max_memory_allocated() - base
        torch.autograd.backward(loss, seed)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 3 + (mode == "stream") + check, kernels
    grad_bytes = t_rows * h * hidden.element_size() if mode != "0" else 0
    assert grad_bytes <= fwd_peak < grad_bytes + 64 * 1024, f"forward allocated {fwd_peak} bytes"
    unscored = torch.ones(t_rows, dtype=torch.bool, device="cuda")
    unscored[scored] = False
    assert torch.count_nonzero(hidden.grad[unscored]) == 0 and not hidden.grad[unscored].isnan().any()
    h64, w64, b64, nw64 = to64(hidden, w, b, nw)
    loss64 = fused_reward_loss_ref(h64, scored, pairs_t, w64, b64, nw64, 1e-6, m.double(), 0.01)[0]
    loss64.backward()
    assert_close64(hidden.grad, h64.grad, torch.bfloat16, "dhidden")
    assert_close64(w.grad, w64.grad, torch.bfloat16, "dhead_weight", scale=4)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["1", "stream"])
def test_gpu_zero_in_forward_mode_under_cuda_graph(monkeypatch, mode):
    """A zero-in-forward mode captures in a CUDA graph (no host sync; the benchmark graph-times it; the stream
    mode's side stream forks and joins inside the capture) and a replay gives, bit for bit, the eager default
    mode's loss and gradients."""
    t_rows, h = 4099, 3584
    pairs = [[2 * i, 2 * i + 1] for i in range(16)] + [[0, 5]]
    hidden, scored, pairs_t, w, b, nw, m = reward_inputs(t_rows, h, 32, pairs, torch.bfloat16, True, True)
    params = (hidden, w, b, nw)

    def step():
        for t in params:
            t.grad = None
        loss = fused_reward_loss(hidden, scored, pairs_t, w, b, nw, 1e-6, m, 0.01, backend="triton",
                                 check_indices=False)[0]
        loss.backward()
        return loss

    monkeypatch.setenv(ZERO_IN_FORWARD_ENV, "0")
    # detached: a loss that keeps its autograd graph alive keeps the leaves' AccumulateGrad nodes, created here on
    # the default stream, and the captured backward would then make the legacy stream wait on the capture (H200 run
    # E: cudaErrorStreamCaptureImplicit; torch warns about exactly this)
    loss_off = step().detach()
    grads_off = [t.grad.clone() for t in params]
    monkeypatch.setenv(ZERO_IN_FORWARD_ENV, mode)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for t in params:
            t.grad = None
        loss = fused_reward_loss(hidden, scored, pairs_t, w, b, nw, 1e-6, m, 0.01, backend="triton",
                                 check_indices=False)[0]
        loss.backward()
    for t in params:
        t.grad.fill_(float("nan"))  # the replay must rewrite every element of the graph's gradient buffers
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(loss, loss_off)
    for g, g_off in zip((t.grad for t in params), grads_off):
        assert torch.equal(g, g_off)


@pytest.mark.gpu
def test_gpu_zero_stream_mode_runs_beside_and_survives_unused_forwards(monkeypatch):
    """The stream mode's fill runs on the side stream (the profiler sees the fill and the row kernel on two
    streams); forwards whose backward never runs, interleaved with allocations on the caller's stream that reuse
    their freed blocks, leave the next step's gradients exact (record_stream keeps a block from the caller's stream
    until the side stream's fill is done); gradient accumulation over two forwards then two backwards sums
    exactly."""
    from torch.profiler import ProfilerActivity, profile

    t_rows, h = 4099, 3584
    pairs = [[2 * i, 2 * i + 1] for i in range(16)]
    hidden, scored, pairs_t, w, b, nw, m = reward_inputs(t_rows, h, 32, pairs, torch.bfloat16, True, True)
    params = (hidden, w, b, nw)

    def loss_of():
        return fused_reward_loss(hidden, scored, pairs_t, w, b, nw, 1e-6, m, 0.01, backend="triton",
                                 check_indices=False)[0]

    monkeypatch.setenv(ZERO_IN_FORWARD_ENV, "0")
    loss_of().backward()
    expected = [t.grad.clone() for t in params]
    monkeypatch.setenv(ZERO_IN_FORWARD_ENV, "stream")
    for t in params:
        t.grad = None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loss_of().backward()
        torch.cuda.synchronize()
    # kineto's CUDA kernel events carry their stream as the device resource id
    streams = {e.name(): e.device_resource_id() for e in prof.profiler.kineto_results.events()
               if e.device_type() == torch.autograd.DeviceType.CUDA}
    fill = [sid for name, sid in streams.items() if "_zero_unscored_kernel" in name]
    row = [sid for name, sid in streams.items() if "_reward_fwd_kernel" in name]
    assert len(fill) == 1 and len(row) == 1 and fill[0] != row[0], streams
    for got, exp in zip((t.grad for t in params), expected):
        assert torch.equal(got, exp)
    for _ in range(3):  # unused forwards; their buffers are freed while the fill may still run
        loss_of()
        junk = torch.full((t_rows, h), float("nan"), dtype=torch.bfloat16, device="cuda")
        del junk
    for t in params:
        t.grad = None
    first, second = loss_of(), loss_of()
    first.backward()
    second.backward()
    torch.cuda.synchronize()
    for got, exp in zip((t.grad for t in params), expected):
        torch.testing.assert_close(got, 2 * exp, rtol=1e-2, atol=0)  # two bf16 sums of equal terms: exact in fp32
    assert torch.count_nonzero(hidden.grad[~torch.isin(torch.arange(t_rows, device="cuda"), scored)]) == 0
