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

from vlr_kernels._backend import BackendUnavailable, resolve_backend

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
        (scored_index.min() >= 0, f"scored_index has entries < 0"),
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
        ``loss`` 0-d float32, ``rewards [S]`` float32 (float64 for float64 hidden), ``accuracy`` 0-d float32 =
        fraction of pairs with ``r_c > r_r`` (no gradient). Differentiable w.r.t. hidden, norm_weight, head_weight
        and head_bias.
    """
    check_reward_inputs(hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, margin, check_indices)
    name = resolve_backend("fused_reward_loss", hidden.device, backend, _BACKENDS)
    if name == "torch":
        return fused_reward_loss_ref(
            hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, eps, margin, center_coef
        )
    raise BackendUnavailable(f"fused_reward_loss: backend {name!r} is not implemented yet; use backend='torch'")


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
    raise BackendUnavailable(f"reward_scores: backend {name!r} is not implemented yet; use backend='torch'")


class _GatherScoredRows(torch.autograd.Function):
    """Sequence-parallel gather of the scored rows: local rows in, all ``[S, H]`` rows out on every rank."""

    @staticmethod
    def forward(ctx, hidden_local, local_pos, local_rows, num_scored, group):
        out = hidden_local.new_zeros(num_scored, hidden_local.shape[1])
        out[local_pos] = hidden_local[local_rows]
        dist.all_reduce(out, group=group)
        ctx.save_for_backward(local_pos, local_rows)
        ctx.num_local = hidden_local.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # Every rank computes the same loss from the same rows, so each rank's local rows receive exactly the
        # replicated gradient; summing across ranks here would count it tp times.
        local_pos, local_rows = ctx.saved_tensors
        grad = grad_out.new_zeros(ctx.num_local, grad_out.shape[1])
        grad[local_rows] = grad_out[local_pos]
        return grad, None, None, None, None


def gather_scored_rows(
    hidden_local: torch.Tensor, scored_index: torch.Tensor, token_offset: int, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Sequence-parallel helper: ``[S, H]`` scored rows on every rank of ``group``, differentiable.

    Args:
        hidden_local: ``[T_local, H]`` this rank's slice of the packed tokens, global rows
            ``[token_offset, token_offset + T_local)``.
        scored_index: ``[S]`` int64 *global* row indices (the same tensor on every rank).
    Returns ``[S, H]``; call :func:`fused_reward_loss` on it with ``scored_index = arange(S)``.
    """
    if hidden_local.dim() != 2 or scored_index.dim() != 1 or scored_index.dtype != torch.int64:
        raise ValueError("gather_scored_rows needs hidden_local [T_local, H] and scored_index [S] int64")
    local = (scored_index >= token_offset) & (scored_index < token_offset + hidden_local.shape[0])
    local_pos = local.nonzero().squeeze(1)
    local_rows = scored_index[local_pos] - token_offset
    return _GatherScoredRows.apply(hidden_local, local_pos, local_rows, scored_index.numel(), group)
