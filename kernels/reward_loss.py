"""Fused reward head + pairwise (Bradley-Terry) loss over packed hidden states.

Only the ``S`` scored rows of ``hidden [T, H]`` are read (optionally RMS-normalised with the final norm weight) and
projected by the scalar head; the ``T - S`` other tokens are never normalised or projected. Backward writes
``dL/dhidden`` at the scored rows; the rest of the gradient is one zero fill.

Forward, per scored row ``s`` (fp32 math whatever the input dtype)::

    x = hidden[scored_index[s]];  n = x * rsqrt(mean(x**2) + eps) * norm_weight   (or n = x without norm_weight)
    rewards[s] = dot(n, head_weight) + head_bias
    d_p  = rewards[chosen_p] - rewards[rejected_p] - margin_p
    loss = mean_p(softplus(-d_p)) + center_coef * mean_s(rewards**2)

Sequence parallelism: scored rows are *gathered before the op* (:func:`gather_scored_rows`): each rank copies its
local scored rows into an ``[S, H]`` buffer and one all-reduce makes the buffer whole on every rank, so every rank
computes the same loss and the head/norm weight gradients need no extra reduction. Backward of the gather routes each
row's gradient back to the rank that holds it. ``S * H`` is tiny next to ``T * H``, so the all-reduce is cheap.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from vlr_kernels._backend import resolve_backend
from vlr_kernels._triton_compat import tl, triton, triton_jit

_BACKENDS = ("triton", "cuda", "torch")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (references in tests); everything else is computed in float32."""
    return torch.promote_types(t.dtype, torch.float32)


def check_reward_inputs(
    hidden: torch.Tensor,
    scored_index: torch.Tensor,
    pair_index: torch.Tensor | None,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    norm_weight: torch.Tensor | None,
    margin: torch.Tensor | None,
    check_indices: bool = True,
) -> None:
    """Raise ValueError naming the first bad argument. Index bounds/uniqueness are checked when ``check_indices``:
    synchronously on CPU, with ``torch._assert_async`` (no host sync) on CUDA."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got shape {tuple(hidden.shape)}")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be floating point, got {hidden.dtype}")
    t_rows, h = hidden.shape
    if scored_index.dim() != 1 or scored_index.dtype != torch.int64:
        raise ValueError(f"scored_index must be a 1-D int64 tensor, got {scored_index.dtype} {tuple(scored_index.shape)}")
    if scored_index.numel() == 0:
        raise ValueError("scored_index is empty: nothing to score")
    if head_weight.shape != (h,):
        raise ValueError(f"head_weight must be [H]=[{h}], got {tuple(head_weight.shape)}")
    if head_bias.numel() != 1 or head_bias.dim() > 1:
        raise ValueError(f"head_bias must be 0-d or [1], got {tuple(head_bias.shape)}")
    if norm_weight is not None and norm_weight.shape != (h,):
        raise ValueError(f"norm_weight must be [H]=[{h}], got {tuple(norm_weight.shape)}")
    tensors = [("scored_index", scored_index), ("head_weight", head_weight), ("head_bias", head_bias)]
    if norm_weight is not None:
        tensors.append(("norm_weight", norm_weight))
    s = scored_index.numel()
    if pair_index is not None:
        if pair_index.dim() != 2 or pair_index.shape[1] != 2 or pair_index.dtype != torch.int64:
            raise ValueError(f"pair_index must be [P, 2] int64, got {pair_index.dtype} {tuple(pair_index.shape)}")
        if pair_index.shape[0] == 0:
            raise ValueError("pair_index is empty: the loss needs at least one pair")
        tensors.append(("pair_index", pair_index))
        if margin is not None:
            if margin.shape != (pair_index.shape[0],) or not margin.is_floating_point():
                raise ValueError(f"margin must be float [P]=[{pair_index.shape[0]}], got {tuple(margin.shape)}")
            tensors.append(("margin", margin))
    for name, t in tensors:
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if not check_indices:
        return
    checks = [
        (scored_index.min() >= 0, "scored_index has entries < 0"),
        (scored_index.max() < t_rows, f"scored_index has entries >= T={t_rows}"),
        ((scored_index.sort().values.diff() != 0).all(), "scored_index has duplicate rows"),
    ]
    if pair_index is not None:
        checks += [
            (pair_index.min() >= 0, "pair_index has entries < 0"),
            (pair_index.max() < s, f"pair_index has entries >= S={s} (it indexes scored_index)"),
        ]
    for ok, msg in checks:
        if hidden.device.type == "cuda":
            torch._assert_async(ok, msg)
        elif not bool(ok):
            raise ValueError(msg)


def _scored_rewards_ref(
    hidden: torch.Tensor,
    scored_index: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    norm_weight: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    ct = _compute_dtype(hidden)
    rows = hidden.index_select(0, scored_index).to(ct)
    if norm_weight is not None:
        rows = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.to(ct)
    return rows @ head_weight.to(ct) + head_bias.to(ct).reshape(())


def pairwise_loss_from_rewards(
    rewards: torch.Tensor, pair_index: torch.Tensor, margin: torch.Tensor | None, center_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, accuracy)`` from ``rewards [S]`` - the loss part of the reference, also usable on its own."""
    diff = rewards[pair_index[:, 0]] - rewards[pair_index[:, 1]]
    accuracy = (diff.detach() > 0).float().mean()
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    loss = F.softplus(-diff).mean()  # softplus(-d) == -logsigmoid(d), stable for any |d|
    if center_coef:
        loss = loss + center_coef * rewards.pow(2).mean()
    return loss, accuracy


def fused_reward_loss_ref(
    hidden: torch.Tensor,
    scored_index: torch.Tensor,
    pair_index: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager reference of :func:`fused_reward_loss` (autograd through plain PyTorch ops)."""
    rewards = _scored_rewards_ref(hidden, scored_index, head_weight, head_bias, norm_weight, eps)
    loss, accuracy = pairwise_loss_from_rewards(rewards, pair_index, margin, center_coef)
    return loss, rewards, accuracy


@triton_jit
def _reward_fwd_kernel(
    h_ptr, idx_ptr, w_ptr, b_ptr, g_ptr, rewards_ptr, rstd_ptr, n_cols, stride_t, eps,
    HAS_NORM: tl.constexpr, BLOCK_H: tl.constexpr,
):
    s = tl.program_id(0)
    row = tl.load(idx_ptr + s)
    cols = tl.arange(0, BLOCK_H)
    dot = tl.zeros([BLOCK_H], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_H], dtype=tl.float32)
    # one pass: rstd is a per-row scalar, so reward = rstd * dot(x, norm_w * head_w) + b
    for start in range(0, n_cols, BLOCK_H):
        c = start + cols
        mask = c < n_cols
        x = tl.load(h_ptr + row * stride_t + c, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
        if HAS_NORM:
            w = w * tl.load(g_ptr + c, mask=mask, other=0.0).to(tl.float32)
            sumsq += x * x
        dot += x * w
    rstd = 1.0
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(sumsq, axis=0) / n_cols + eps)
    reward = tl.sum(dot, axis=0) * rstd + tl.load(b_ptr).to(tl.float32)
    tl.store(rewards_ptr + s, reward)
    tl.store(rstd_ptr + s, rstd)


@triton_jit
def _pair_loss_kernel(
    rewards_ptr, pair_ptr, margin_ptr, loss_ptr, acc_ptr, n_scored, n_pairs, center_coef,
    HAS_MARGIN: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    loss = tl.zeros([BLOCK], dtype=tl.float32)
    correct = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_pairs, BLOCK):
        p = start + offs
        mask = p < n_pairs
        rc = tl.load(rewards_ptr + tl.load(pair_ptr + 2 * p, mask=mask, other=0), mask=mask, other=0.0)
        rr = tl.load(rewards_ptr + tl.load(pair_ptr + 2 * p + 1, mask=mask, other=0), mask=mask, other=0.0)
        d = rc - rr
        correct += tl.where(mask & (d > 0), 1.0, 0.0)
        if HAS_MARGIN:
            d -= tl.load(margin_ptr + p, mask=mask, other=0.0).to(tl.float32)
        # -logsigmoid(d) = softplus(-d) = max(-d, 0) + log(1 + exp(-|d|)): no overflow for any d
        sp = tl.maximum(-d, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(d)))
        loss += tl.where(mask, sp, 0.0)
    total = tl.sum(loss, axis=0) / n_pairs
    sq = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_scored, BLOCK):
        r = tl.load(rewards_ptr + start + offs, mask=start + offs < n_scored, other=0.0)
        sq += r * r
    total += center_coef * tl.sum(sq, axis=0) / n_scored
    tl.store(loss_ptr, total)
    tl.store(acc_ptr, tl.sum(correct, axis=0) / n_pairs)


@triton_jit
def _reward_bwd_kernel(
    h_ptr, idx_ptr, pair_ptr, margin_ptr, w_ptr, b_ptr, g_ptr, rewards_ptr, rstd_ptr, dloss_ptr, drewards_ptr,
    dh_ptr, dr_ptr, dw_part_ptr, dg_part_ptr, n_cols, stride_t, stride_dt, n_scored, n_pairs, center_coef,
    HAS_NORM: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_DREWARDS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr,
):
    s = tl.program_id(0)
    # dL/dr_s: each pair adds -sigmoid(-d)/P to its chosen reward and the opposite to its rejected one
    offs = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, n_pairs, BLOCK_P):
        p = start + offs
        mask = p < n_pairs
        ic = tl.load(pair_ptr + 2 * p, mask=mask, other=-1)
        ir = tl.load(pair_ptr + 2 * p + 1, mask=mask, other=-1)
        hit = ((ic == s) | (ir == s)) & mask
        rc = tl.load(rewards_ptr + ic, mask=hit, other=0.0)
        rr = tl.load(rewards_ptr + ir, mask=hit, other=0.0)
        d = rc - rr
        if HAS_MARGIN:
            d -= tl.load(margin_ptr + p, mask=hit, other=0.0).to(tl.float32)
        sig_neg = 1.0 / (1.0 + tl.exp(d))
        sign = tl.where(ic == s, 1.0, 0.0) - tl.where(ir == s, 1.0, 0.0)
        acc += tl.where(hit, -sig_neg * sign, 0.0)
    r_s = tl.load(rewards_ptr + s)
    g_r = tl.sum(acc, axis=0) / n_pairs + 2.0 * center_coef * r_s / n_scored
    g_r = g_r * tl.load(dloss_ptr).to(tl.float32)
    if HAS_DREWARDS:
        g_r += tl.load(drewards_ptr + s).to(tl.float32)
    tl.store(dr_ptr + s, g_r)
    row = tl.load(idx_ptr + s)
    rstd = tl.load(rstd_ptr + s)
    # mean(dL/dxhat * xhat) = g_r * (r_s - b) / H, known from the forward: no extra pass over the row
    proj = g_r * (r_s - tl.load(b_ptr).to(tl.float32)) / n_cols
    part = s.to(tl.int64) * n_cols  # this row's slice of the [S, H] partials
    cols = tl.arange(0, BLOCK_H)
    for start in range(0, n_cols, BLOCK_H):
        c = start + cols
        mask = c < n_cols
        x = tl.load(h_ptr + row * stride_t + c, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
        if HAS_NORM:
            g = tl.load(g_ptr + c, mask=mask, other=0.0).to(tl.float32)
            xhat = x * rstd
            dx = rstd * (g_r * w * g - xhat * proj)
            tl.store(dw_part_ptr + part + c, g_r * xhat * g, mask=mask)
            tl.store(dg_part_ptr + part + c, g_r * xhat * w, mask=mask)
        else:
            dx = g_r * w
            tl.store(dw_part_ptr + part + c, g_r * x, mask=mask)
        tl.store(dh_ptr + row * stride_dt + c, dx.to(dh_ptr.dtype.element_ty), mask=mask)


def _block_h(n_cols: int) -> int:
    return min(triton.next_power_of_2(n_cols), 2048)


def reward_fwd(
    hidden: torch.Tensor, scored_index: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor,
    norm_weight: torch.Tensor | None, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher: ``(rewards [S] fp32, rstd [S] fp32)`` (rstd = 1 without a norm)."""
    s = scored_index.numel()
    rewards = torch.empty(s, dtype=torch.float32, device=hidden.device)
    rstd = torch.empty(s, dtype=torch.float32, device=hidden.device)
    block_h = _block_h(hidden.shape[1])
    _reward_fwd_kernel[(s,)](
        hidden, scored_index, head_weight, head_bias, norm_weight if norm_weight is not None else head_weight,
        rewards, rstd, hidden.shape[1], hidden.stride(0), eps,
        HAS_NORM=norm_weight is not None, BLOCK_H=block_h, num_warps=4,
    )
    return rewards, rstd


def pair_loss_fwd(
    rewards: torch.Tensor, pair_index: torch.Tensor, margin: torch.Tensor | None, center_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher: ``(loss, accuracy)`` 0-d fp32 from ``rewards [S]``."""
    loss = torch.empty((), dtype=torch.float32, device=rewards.device)
    acc = torch.empty((), dtype=torch.float32, device=rewards.device)
    _pair_loss_kernel[(1,)](
        rewards, pair_index, margin if margin is not None else rewards, loss, acc, rewards.numel(),
        pair_index.shape[0], float(center_coef), HAS_MARGIN=margin is not None, BLOCK=1024, num_warps=4,
    )
    return loss, acc


@triton_jit
def _param_grad_kernel(
    dw_part_ptr, dg_part_ptr, dr_ptr, dw_ptr, dg_ptr, db_ptr, n_scored, n_cols,
    HAS_NORM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # column sums of the per-row partials, written straight in the parameters' dtypes; program 0 also sums db.
    # A [BLOCK_R, BLOCK_C] tile per iteration: the S rows cost S / BLOCK_R dependent memory round trips, not S.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < n_cols
    r = tl.arange(0, BLOCK_R)
    sw = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    sg = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for start in range(0, n_scored, BLOCK_R):
        rows = start + r
        offs = rows.to(tl.int64)[:, None] * n_cols + c[None, :]  # S * H may exceed 2**31
        mask = (rows < n_scored)[:, None] & cmask[None, :]
        sw += tl.load(dw_part_ptr + offs, mask=mask, other=0.0)
        if HAS_NORM:
            sg += tl.load(dg_part_ptr + offs, mask=mask, other=0.0)
    tl.store(dw_ptr + c, tl.sum(sw, axis=0).to(dw_ptr.dtype.element_ty), mask=cmask)
    if HAS_NORM:
        tl.store(dg_ptr + c, tl.sum(sg, axis=0).to(dg_ptr.dtype.element_ty), mask=cmask)
    if tl.program_id(0) == 0:
        s_offs = tl.arange(0, BLOCK_S)
        acc = tl.zeros([BLOCK_S], dtype=tl.float32)
        for start in range(0, n_scored, BLOCK_S):
            acc += tl.load(dr_ptr + start + s_offs, mask=start + s_offs < n_scored, other=0.0)
        tl.store(db_ptr, tl.sum(acc, axis=0).to(db_ptr.dtype.element_ty))


def reward_loss_bwd(
    dloss: torch.Tensor, drewards: torch.Tensor | None, hidden: torch.Tensor, scored_index: torch.Tensor,
    pair_index: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor, norm_weight: torch.Tensor | None,
    margin: torch.Tensor | None, center_coef: float, rewards: torch.Tensor, rstd: torch.Tensor,
    dhidden: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Triton launcher: ``(dhidden [T, H], dhead_weight [H], dhead_bias, dnorm_weight [H] | None)``. ``dhidden``:
    a zero-filled contiguous ``[T, H]`` buffer to write the S scored rows into (allocated here when None)."""
    s, n_cols = scored_index.numel(), hidden.shape[1]
    if dhidden is None:
        dhidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format)
    dr = torch.empty(s, dtype=torch.float32, device=hidden.device)
    dw_part = torch.empty((s, n_cols), dtype=torch.float32, device=hidden.device)
    dg_part = torch.empty_like(dw_part) if norm_weight is not None else dw_part
    _reward_bwd_kernel[(s,)](
        hidden, scored_index, pair_index, margin if margin is not None else rewards, head_weight, head_bias,
        norm_weight if norm_weight is not None else head_weight, rewards, rstd, dloss,
        drewards if drewards is not None else rewards, dhidden, dr, dw_part, dg_part, n_cols, hidden.stride(0),
        dhidden.stride(0), s, pair_index.shape[0], float(center_coef),
        HAS_NORM=norm_weight is not None, HAS_MARGIN=margin is not None, HAS_DREWARDS=drewards is not None,
        BLOCK_P=256, BLOCK_H=_block_h(n_cols), num_warps=4,
    )
    dw = torch.empty_like(head_weight)
    db = torch.empty_like(head_bias)
    dg = torch.empty_like(norm_weight) if norm_weight is not None else None
    block_c = 128
    _param_grad_kernel[(triton.cdiv(n_cols, block_c),)](
        dw_part, dg_part, dr, dw, dg if dg is not None else dw, db, s, n_cols,
        HAS_NORM=norm_weight is not None, BLOCK_C=block_c, BLOCK_R=32, BLOCK_S=1024, num_warps=8,
    )
    return dhidden, dw, db, dg


class FusedRewardLossFunction(torch.autograd.Function):
    """Autograd wrapper: forward = rewards of the scored rows + pair loss; backward = grads of hidden (scored rows
    only), head weight/bias and norm weight. ``impl`` is ``"triton"`` or ``"cuda"``."""

    @staticmethod
    def forward(ctx, hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, eps, margin,
                center_coef, impl):
        # The zero fill of dL/dhidden (T x H, the only large write) is queued first, so the GPU does it while the
        # host launches the forward kernels and runs the autograd engine; backward then writes only the S scored
        # rows. The buffer is the gradient itself, so the peak is unchanged (the loss is the last op of a forward).
        ctx.dhidden = None
        if impl == "triton" and ctx.needs_input_grad[0]:
            ctx.dhidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format)
        ops = _launchers(impl)
        rewards, rstd = ops.reward_fwd(hidden, scored_index, head_weight, head_bias, norm_weight, eps)
        loss, acc = ops.pair_loss_fwd(rewards, pair_index, margin, center_coef)
        ctx.save_for_backward(hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, margin,
                              rewards, rstd)
        ctx.center_coef, ctx.impl = center_coef, impl
        ctx.mark_non_differentiable(acc)
        ctx.set_materialize_grads(False)  # an unused rewards output then costs no zero-filled gradient
        return loss, rewards, acc

    @staticmethod
    def backward(ctx, dloss, drewards, _dacc):
        hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, margin, rewards, rstd = (
            ctx.saved_tensors
        )
        dloss = dloss if dloss is not None else torch.zeros((), dtype=torch.float32, device=hidden.device)
        args = (dloss.float().contiguous(), drewards.float().contiguous() if drewards is not None else None, hidden,
                scored_index, pair_index, head_weight, head_bias, norm_weight, margin, ctx.center_coef, rewards, rstd)
        if ctx.impl == "triton":
            dh, dw, db, dg = reward_loss_bwd(*args, dhidden=ctx.dhidden)
        else:
            dh, dw, db, dg = _CudaLaunchers.reward_loss_bwd(*args)
        ctx.dhidden = None
        return dh, None, None, dw, db, dg, None, None, None, None


class _TritonLaunchers:
    reward_fwd = staticmethod(reward_fwd)
    pair_loss_fwd = staticmethod(pair_loss_fwd)


class _CudaLaunchers:
    """The same three launchers backed by ``csrc/cuda/reward_loss.cu`` (ops registered as ``torch.ops.vlr_kernels``
    when ``vlr_kernels._cuda`` is imported)."""

    @staticmethod
    def reward_fwd(hidden, scored_index, head_weight, head_bias, norm_weight, eps):
        return torch.ops.vlr_kernels.reward_fwd(hidden, scored_index, head_weight, head_bias, norm_weight, eps)

    @staticmethod
    def pair_loss_fwd(rewards, pair_index, margin, center_coef):
        return torch.ops.vlr_kernels.pair_loss_fwd(rewards, pair_index, margin, float(center_coef))

    @staticmethod
    def reward_loss_bwd(dloss, drewards, hidden, scored_index, pair_index, head_weight, head_bias, norm_weight,
                        margin, center_coef, rewards, rstd):
        dh, dw, db, dg = torch.ops.vlr_kernels.reward_loss_bwd(
            dloss, drewards, hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, margin,
            float(center_coef), rewards, rstd,
        )
        return dh, dw, db.reshape(head_bias.shape), (dg if norm_weight is not None else None)


_CUDA_OPS_LOADED = False


def _load_cuda_ops() -> None:
    """Import the extension (its static initialisers register ``torch.ops.vlr_kernels.*``) and register the
    shape-only fake implementations that torch.compile traces with; later calls return at once. A flag rather
    than ``functools.cache``: dynamo traces through a cache wrapper into the import and the registrations."""
    global _CUDA_OPS_LOADED
    if _CUDA_OPS_LOADED:
        return
    import vlr_kernels._cuda  # noqa: F401

    @torch.library.register_fake("vlr_kernels::reward_fwd")
    def _(hidden, scored_index, head_weight, head_bias, norm_weight, eps):
        s = scored_index.shape[0]
        return hidden.new_empty(s, dtype=torch.float32), hidden.new_empty(s, dtype=torch.float32)

    @torch.library.register_fake("vlr_kernels::pair_loss_fwd")
    def _(rewards, pair_index, margin, center_coef):
        return rewards.new_empty(()), rewards.new_empty(())

    @torch.library.register_fake("vlr_kernels::reward_loss_bwd")
    def _(dloss, drewards, hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, margin,
          center_coef, rewards, rstd):
        dg = torch.empty_like(norm_weight) if norm_weight is not None else head_weight.new_empty(0)
        return hidden.new_empty(hidden.shape), torch.empty_like(head_weight), head_bias.new_empty(1), dg

    _CUDA_OPS_LOADED = True


def _launchers(impl: str):
    if impl == "cuda":
        _load_cuda_ops()
        return _CudaLaunchers
    return _TritonLaunchers


def _kernel_inputs(hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, margin):
    """Kernels index rows with a row stride but need unit stride along H and contiguous small tensors."""
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    contig = [t.contiguous() if t is not None else None
              for t in (scored_index, pair_index, head_weight, head_bias.reshape(-1), norm_weight, margin)]
    return (hidden, *contig)


def fused_reward_loss(
    hidden: torch.Tensor,
    scored_index: torch.Tensor,
    pair_index: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
    backend: str | None = None,
    check_indices: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reward head (+ optional final RMSNorm) on the scored rows and the pairwise Bradley-Terry loss.

    Args:
        hidden: ``[T, H]`` packed hidden states (fp32/fp16/bf16), before the final norm if ``norm_weight`` is given.
        scored_index: ``[S]`` int64, the row of ``hidden`` holding each sequence's scored token (unique rows).
        pair_index: ``[P, 2]`` int64 positions in ``scored_index``: (chosen, rejected). One chosen vs k rejected is
            k rows sharing the same chosen.
        head_weight: ``[H]``; head_bias: 0-d or ``[1]``; norm_weight: ``[H]`` or None (hidden is already normalised).
        margin: ``[P]`` or None: ``loss = mean(-logsigmoid(r_c - r_r - margin)) + center_coef * mean(rewards**2)``.
        backend: ``"triton"``, ``"cuda"``, ``"torch"`` or None (automatic, see :mod:`vlr_kernels._backend`).
        check_indices: verify index bounds/uniqueness (on CUDA without a host sync, via ``torch._assert_async``).

    Returns:
        ``loss`` 0-d float32, ``rewards [S]`` float32 (the torch backend keeps float64 for float64 hidden),
        ``accuracy`` 0-d float32 =
        fraction of pairs with ``r_c > r_r`` (no gradient). Differentiable w.r.t. hidden, norm_weight, head_weight
        and head_bias.
    """
    check_reward_inputs(hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, margin, check_indices)
    name = resolve_backend("fused_reward_loss", hidden.device, backend, _BACKENDS)
    if name == "torch":
        return fused_reward_loss_ref(
            hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, eps, margin, center_coef
        )
    hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, margin = _kernel_inputs(
        hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, margin
    )
    loss, rewards, accuracy = FusedRewardLossFunction.apply(
        hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, eps, margin, center_coef, name
    )
    return loss, rewards, accuracy


@torch.no_grad()
def reward_scores(
    hidden: torch.Tensor,
    scored_index: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    backend: str | None = None,
    check_indices: bool = True,
) -> torch.Tensor:
    """Scoring only (no grad, no loss): ``rewards [S]`` float32 for the scored rows of ``hidden [T, H]``.
    Arguments as in :func:`fused_reward_loss`."""
    check_reward_inputs(hidden, scored_index, None, head_weight, head_bias, norm_weight, None, check_indices)
    name = resolve_backend("fused_reward_loss", hidden.device, backend, _BACKENDS)
    if name == "torch":
        return _scored_rewards_ref(hidden, scored_index, head_weight, head_bias, norm_weight, eps)
    hidden, scored_index, _, head_weight, head_bias, norm_weight, _ = _kernel_inputs(
        hidden, scored_index, None, head_weight, head_bias, norm_weight, None
    )
    return _launchers(name).reward_fwd(hidden, scored_index, head_weight, head_bias, norm_weight, eps)[0]


class _GatherScoredRows(torch.autograd.Function):
    """Sequence-parallel gather of the scored rows: local rows in, all ``[S, H]`` rows out on every rank."""

    @staticmethod
    def forward(ctx, hidden_local, rows, is_local, group):
        out = torch.where(is_local[:, None], hidden_local.index_select(0, rows), 0)
        dist.all_reduce(out, group=group)
        ctx.save_for_backward(rows, is_local)
        ctx.num_local = hidden_local.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # Every rank computes the same loss from the same rows, so each rank's local rows receive exactly the
        # replicated gradient; summing across ranks here would count it tp times.
        rows, is_local = ctx.saved_tensors
        grad = grad_out.new_zeros(ctx.num_local, grad_out.shape[1])
        grad.index_add_(0, rows, torch.where(is_local[:, None], grad_out, 0))
        return grad, None, None, None


def gather_scored_rows(
    hidden_local: torch.Tensor, scored_index: torch.Tensor, token_offset: int, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Sequence-parallel helper: ``[S, H]`` scored rows on every rank of ``group``, differentiable, no host sync.

    Args:
        hidden_local: ``[T_local, H]`` this rank's slice of the packed tokens, global rows
            ``[token_offset, token_offset + T_local)``.
        scored_index: ``[S]`` int64 *global* row indices (the same tensor on every rank).
    Returns ``[S, H]``; call :func:`fused_reward_loss` on it with ``scored_index = arange(S)``.

    The loss, and the head/norm weight gradients it yields, are then complete and identical on every rank: do not
    all-reduce those weight gradients again across the group (e.g. a final-norm weight that megatron marks
    ``sequence_parallel`` gets its gradient all-reduced over TP; apply that norm in the model, or pass it here only
    if its gradient is not reduced again).
    """
    if hidden_local.dim() != 2 or scored_index.dim() != 1 or scored_index.dtype != torch.int64:
        raise ValueError("gather_scored_rows needs hidden_local [T_local, H] and scored_index [S] int64")
    local_rows = scored_index - token_offset
    is_local = (local_rows >= 0) & (local_rows < hidden_local.shape[0])
    rows = local_rows.clamp(0, hidden_local.shape[0] - 1)  # rows of other ranks read a valid row, then masked
    return _GatherScoredRows.apply(hidden_local, rows, is_local, group)
