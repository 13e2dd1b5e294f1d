"""The ``cuda`` backend of :mod:`vlr_kernels.reward_loss`: launchers over the ``torch.ops.vlr_kernels`` ops that
``csrc/cuda/reward_loss*.{cu,cpp}`` register (same decomposition and signatures as the Triton launchers), and the
shape-only fake implementations torch.compile traces them with."""

from __future__ import annotations

import torch


class CudaLaunchers:
    """The same three launchers backed by ``csrc/cuda/reward_loss.cu`` (ops registered as ``torch.ops.vlr_kernels``
    when ``vlr_kernels._cuda`` is imported)."""

    @staticmethod
    def reward_fwd(hidden, scored_index, head_weight, head_bias, norm_weight, eps, check=False):
        return torch.ops.vlr_kernels.reward_fwd(hidden, scored_index, head_weight, head_bias, norm_weight, eps,
                                                check)

    @staticmethod
    def pair_loss_fwd(rewards, pair_index, margin, row_ok, center_coef, check=False):
        return torch.ops.vlr_kernels.pair_loss_fwd(rewards, pair_index, margin, row_ok if check else None,
                                                   float(center_coef))

    @staticmethod
    def reward_loss_bwd(dloss, drewards, hidden, scored_index, head_weight, head_bias, norm_weight, rewards, rstd,
                        coef):
        dh, dw, db, dg = torch.ops.vlr_kernels.reward_loss_bwd(
            dloss, drewards, hidden, scored_index, head_weight, head_bias, norm_weight, rewards, rstd, coef,
        )
        return dh, dw, db.reshape(head_bias.shape), (dg if norm_weight is not None else None)


_OPS_LOADED = False


def load_cuda_ops() -> None:
    """Import the extension (its static initialisers register ``torch.ops.vlr_kernels.*``) and register the
    shape-only fake implementations that torch.compile traces with; later calls return at once. A flag rather
    than ``functools.cache``: dynamo traces through a cache wrapper into the import and the registrations."""
    global _OPS_LOADED
    if _OPS_LOADED:
        return
    import vlr_kernels._cuda  # noqa: F401

    @torch.library.register_fake("vlr_kernels::reward_fwd")
    def _(hidden, scored_index, head_weight, head_bias, norm_weight, eps, check):
        s = scored_index.shape[0]
        return (hidden.new_empty(s, dtype=torch.float32), hidden.new_empty(s, dtype=torch.float32),
                hidden.new_empty(s, dtype=torch.int32))

    @torch.library.register_fake("vlr_kernels::pair_loss_fwd")
    def _(rewards, pair_index, margin, row_ok, center_coef):
        return rewards.new_empty(()), rewards.new_empty(()), rewards.new_empty((), dtype=torch.int32), \
            torch.empty_like(rewards)

    @torch.library.register_fake("vlr_kernels::reward_loss_bwd")
    def _(dloss, drewards, hidden, scored_index, head_weight, head_bias, norm_weight, rewards, rstd, coef):
        dg = torch.empty_like(norm_weight) if norm_weight is not None else head_weight.new_empty(0)
        return hidden.new_empty(hidden.shape), torch.empty_like(head_weight), head_bias.new_empty(1), dg

    _OPS_LOADED = True
