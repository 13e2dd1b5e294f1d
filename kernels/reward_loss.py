"""Fused reward head + pairwise (Bradley-Terry) loss over packed hidden states.

Only the ``S`` scored rows of ``hidden [T, H]`` are read (optionally RMS-normalised with the final norm weight) and
projected by the scalar head; the ``T - S`` other tokens are never normalised or projected.

Device work per training step (triton and cuda backends, the same decomposition): forward = row kernel (rewards,
rstd, index checks) + pair kernel (loss, accuracy, dloss/dr per row, the checks' verdict); backward = ONE kernel
whose first programs write the scored rows of ``dL/dhidden`` and the head/norm weight gradients (column sums in
registers) while the others write zeros to every unscored row. The gradient is allocated uninitialised: no
separate fill, no ``[T, H]`` buffer in the forward, peak memory = the gradient + O(S) scalars. ``check_indices``
adds one ``torch._assert_async`` on CUDA. The Triton kernels live in :mod:`vlr_kernels.reward_loss_triton`.

Opt-in zero-in-forward modes (triton backend; ``VLR_REWARD_ZERO_IN_FORWARD``, read at every call: unset/``0`` off,
``1`` = ``launch``, ``stream``). Either mode applies only when ``hidden`` needs a gradient (grad mode on and
``hidden.requires_grad``); without one (``torch.no_grad``, :func:`reward_scores`, a frozen input) nothing changes.
The forward then allocates the ``[T, H]`` gradient, which is held from the forward to the backward (in a training
step the loss backward follows at once, so the peak is the default mode's), and the backward launches only the
scored-column programs into it:

* ``launch`` (v5): the row kernel's launch gets zero programs after its S row programs that write zeros to every row
  of the buffer, so the latency-bound row work runs beside the bandwidth-bound write; the scored columns overwrite
  the scored rows later (stream order makes them the last writers).
* ``stream`` (v6, CUDA): the unscored rows' zero programs run alone on a per-device side stream, forked from the
  caller's stream at the forward and joined (one event) at the end of the backward, after the scored columns. The
  row and pair kernels, autograd's seed and the scored columns then all run under the write. Each row has one
  writer, so the two streams need no other ordering; the buffer and ``scored_index`` are ``record_stream``-ed on
  the side stream, so a forward whose backward never runs frees them safely. Under CUDA-graph capture, forward and
  backward must be captured together: a forward captured alone leaves the side stream unjoined and the capture
  fails. On CPU (Triton interpreter) the fill runs in place before the forward's kernels.

With ``backend="cuda"`` (or automatic resolution to it) either mode raises a ValueError: the CUDA ops' forward takes
no gradient buffer, and silently running without the mode would hide that. The ``torch`` reference ignores them (its
autograd gradient is not ours to place).

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

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from vlr_kernels._backend import resolve_backend
from vlr_kernels.reward_loss_cuda import CudaLaunchers
from vlr_kernels.reward_loss_cuda import load_cuda_ops as _load_cuda_ops

# the kernels are re-exported for tests/kernels/triton_sm90.py, which compiles them from this module
from vlr_kernels.reward_loss_triton import (  # noqa: F401
    TritonLaunchers,
    _pair_loss_kernel,
    _reward_bwd_kernel,
    _reward_fwd_kernel,
)

_BACKENDS = ("triton", "cuda", "torch")
ZERO_IN_FORWARD_ENV = "VLR_REWARD_ZERO_IN_FORWARD"
ZERO_IN_FORWARD_MODES = {"": "off", "0": "off", "1": "launch", "stream": "stream"}


def zero_in_forward_mode() -> str:
    """The opt-in zero-in-forward mode, read from ``VLR_REWARD_ZERO_IN_FORWARD`` at each call: ``"off"`` (unset,
    empty or ``0``), ``"launch"`` (``1``) or ``"stream"``; any other value is a ValueError."""
    value = os.environ.get(ZERO_IN_FORWARD_ENV, "")
    if value not in ZERO_IN_FORWARD_MODES:
        raise ValueError(f"{ZERO_IN_FORWARD_ENV} must be 0, 1 or stream, got {value!r}")
    return ZERO_IN_FORWARD_MODES[value]


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _zero_unscored_beside(dhidden: torch.Tensor, scored_index: torch.Tensor) -> torch.cuda.Event | None:
    """The ``stream`` mode's fill: zeros for the unscored rows of ``dhidden`` queued on the device's side stream
    after everything queued so far on the current one; returns the event the backward waits for. On CPU (the
    interpreter) the launch runs in place and None is returned."""
    if dhidden.device.type != "cuda":
        TritonLaunchers.zero_unscored(dhidden, scored_index)
        return None
    current = torch.cuda.current_stream(dhidden.device)
    side = _SIDE_STREAMS.get(dhidden.device)
    if side is None:
        side = _SIDE_STREAMS[dhidden.device] = torch.cuda.Stream(dhidden.device)
    side.wait_stream(current)  # the buffer's block may still be in use by earlier work of the current stream
    with torch.cuda.stream(side):
        TritonLaunchers.zero_unscored(dhidden, scored_index)
    done = torch.cuda.Event()
    done.record(side)
    # freed before the fill ends (no backward), the blocks must not go back to the current stream's pool early
    dhidden.record_stream(side)
    scored_index.record_stream(side)
    return done


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
    """Raise ValueError naming the first bad argument; with ``check_indices`` also :func:`check_index_values`.
    (The triton/cuda paths check index values inside their forward kernels instead.)"""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got shape {tuple(hidden.shape)}")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be floating point, got {hidden.dtype}")
    h = hidden.shape[1]
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
    if check_indices:
        check_index_values(hidden.shape[0], scored_index, pair_index)


def check_index_values(t_rows: int, scored_index: torch.Tensor, pair_index: torch.Tensor | None) -> None:
    """Index bounds/uniqueness with PyTorch ops: a ValueError naming the check on CPU, ``torch._assert_async`` (no
    host sync, one small kernel per check) on CUDA."""
    s = scored_index.numel()
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
        if scored_index.device.type == "cuda":
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


_BAD_INDEX_MSG = (
    "fused_reward_loss: bad indices: scored_index must hold distinct rows in [0, T) and pair_index entries in "
    "[0, S) (a CPU run or backend='torch' names the exact check that failed)"
)


def _raise_on_bad_indices(ok: torch.Tensor, t_rows: int, scored_index: torch.Tensor,
                          pair_index: torch.Tensor | None) -> None:
    """Act on the kernels' index-check verdict ``ok`` (0-d, nonzero = fine): on CUDA one ``torch._assert_async``
    (no host sync); on CPU a ValueError naming the failed check."""
    if ok.device.type == "cuda":
        torch._assert_async(ok, _BAD_INDEX_MSG)
    elif not bool(ok):
        check_index_values(t_rows, scored_index, pair_index)  # raises with the exact reason
        raise RuntimeError("fused_reward_loss: the kernels' index check failed where the reference check passed "
                           "(a kernel bug)")


class FusedRewardLossFunction(torch.autograd.Function):
    """Autograd wrapper: forward = rewards of the scored rows + pair loss (2 kernels); backward = grads of hidden
    (every row, in the same kernel as the head/norm weight grads). ``impl`` is ``"triton"`` or ``"cuda"``;
    ``check`` runs the index checks inside the forward kernels (one ``_assert_async`` on CUDA). ``zero_mode``
    (``"off"``, or for triton ``"launch"`` / ``"stream"``; the caller passes a mode only when hidden needs a
    gradient: ``ctx.needs_input_grad`` is also True under ``torch.no_grad``): the forward allocates the gradient and
    has its unscored rows zeroed in the row kernel's launch or on the side stream (module docstring)."""

    @staticmethod
    def forward(ctx, hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, eps, margin,
                center_coef, impl, check, zero_mode):
        ops = _launchers(impl)
        dhidden = None if zero_mode == "off" else torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        buffer = {"dhidden": dhidden} if zero_mode == "launch" else {}  # only TritonLaunchers take it
        ctx.fill_done = _zero_unscored_beside(dhidden, scored_index) if zero_mode == "stream" else None
        rewards, rstd, row_ok = ops.reward_fwd(hidden, scored_index, head_weight, head_bias, norm_weight, eps, check,
                                               **buffer)
        loss, acc, ok, coef = ops.pair_loss_fwd(rewards, pair_index, margin, row_ok, center_coef, check)
        if check:
            _raise_on_bad_indices(ok, hidden.shape[0], scored_index, pair_index)
        # saved (not a ctx attribute) so autograd frees it once the backward has run and the gradient returned from
        # it is then handed to hidden.grad without a copy
        ctx.save_for_backward(hidden, scored_index, head_weight, head_bias, norm_weight, rewards, rstd, coef,
                              dhidden)
        ctx.impl = impl
        ctx.mark_non_differentiable(acc)
        ctx.set_materialize_grads(False)  # an unused rewards output then costs no zero-filled gradient
        return loss, rewards, acc

    @staticmethod
    def backward(ctx, dloss, drewards, _dacc):
        hidden, scored_index, head_weight, head_bias, norm_weight, rewards, rstd, coef, dhidden = ctx.saved_tensors
        dloss = dloss if dloss is not None else torch.zeros((), dtype=torch.float32, device=hidden.device)
        buffer = {} if dhidden is None else {"dhidden": dhidden, "unscored_zeroed": True}
        dh, dw, db, dg = _launchers(ctx.impl).reward_loss_bwd(
            dloss.float().contiguous(), drewards.float().contiguous() if drewards is not None else None, hidden,
            scored_index, head_weight, head_bias, norm_weight, rewards, rstd, coef, **buffer,
        )
        if ctx.fill_done is not None:  # the side stream's zeros join here, after the scored columns
            torch.cuda.current_stream(dh.device).wait_event(ctx.fill_done)
        return dh, None, None, dw, db, dg, None, None, None, None, None, None


def _launchers(impl: str):
    if impl == "cuda":
        _load_cuda_ops()
        return CudaLaunchers
    return TritonLaunchers


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
        check_indices: verify index bounds/uniqueness. triton/cuda: inside the forward kernels, reported by one
            ``torch._assert_async`` on CUDA (no host sync) or a ValueError on CPU; torch: with PyTorch ops.

    ``VLR_REWARD_ZERO_IN_FORWARD=1`` or ``=stream`` selects a zero-in-forward mode (module docstring; ValueError
    with cuda).

    Returns:
        ``loss`` 0-d float32, ``rewards [S]`` float32 (the torch backend keeps float64 for float64 hidden),
        ``accuracy`` 0-d float32 =
        fraction of pairs with ``r_c > r_r`` (no gradient). Differentiable w.r.t. hidden, norm_weight, head_weight
        and head_bias.
    """
    check_reward_inputs(hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, margin, False)
    name = resolve_backend("fused_reward_loss", hidden.device, backend, _BACKENDS)
    zero_mode = zero_in_forward_mode()
    if zero_mode != "off" and name == "cuda":
        raise ValueError(f"{ZERO_IN_FORWARD_ENV}={os.environ[ZERO_IN_FORWARD_ENV]} is a triton-backend mode: the cuda "
                         "ops' forward takes no gradient buffer; unset it or use backend='triton'")
    if name == "torch":
        if check_indices:
            check_index_values(hidden.shape[0], scored_index, pair_index)
        return fused_reward_loss_ref(
            hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, eps, margin, center_coef
        )
    hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, margin = _kernel_inputs(
        hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, margin
    )
    loss, rewards, accuracy = FusedRewardLossFunction.apply(
        hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, eps, margin, center_coef, name,
        check_indices, zero_mode if torch.is_grad_enabled() and hidden.requires_grad else "off",
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
    """Scoring only (no grad, no loss, one kernel): ``rewards [S]`` float32 for the scored rows of
    ``hidden [T, H]``. Arguments as in :func:`fused_reward_loss`."""
    check_reward_inputs(hidden, scored_index, None, head_weight, head_bias, norm_weight, None, False)
    name = resolve_backend("fused_reward_loss", hidden.device, backend, _BACKENDS)
    if name == "torch":
        if check_indices:
            check_index_values(hidden.shape[0], scored_index, None)
        return _scored_rewards_ref(hidden, scored_index, head_weight, head_bias, norm_weight, eps)
    hidden, scored_index, _, head_weight, head_bias, norm_weight, _ = _kernel_inputs(
        hidden, scored_index, None, head_weight, head_bias, norm_weight, None
    )
    rewards, _, row_ok = _launchers(name).reward_fwd(hidden, scored_index, head_weight, head_bias, norm_weight, eps,
                                                     check_indices)
    if check_indices:
        _raise_on_bad_indices(row_ok.all(), hidden.shape[0], scored_index, None)
    return rewards


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
