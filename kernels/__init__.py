"""vlr_kernels: Triton/CUDA kernels for multimodal reward-model training, usable without the runtime.

Every op has an eager reference (``<op>_ref``), an autograd Function and a public dispatching function that takes
``backend: str | None`` (see :mod:`vlr_kernels._backend`).
"""

from vlr_kernels._backend import BackendUnavailable, resolve_backend, set_default_backend
from vlr_kernels.adamw import adamw_step, adamw_step_ref
from vlr_kernels.reward_loss import (
    fused_reward_loss,
    fused_reward_loss_ref,
    gather_scored_rows,
    reward_scores,
)
from vlr_kernels.rmsnorm import rms_norm, rms_norm_ref
from vlr_kernels.rotary import (
    apply_rotary,
    apply_rotary_qk,
    apply_rotary_ref,
    mrope_cos_sin,
    rope_inv_freq,
    vision_rope_cos_sin,
)
from vlr_kernels.swiglu import swiglu, swiglu_ref
from vlr_kernels.varlen_attention import varlen_attention, varlen_attention_ref

__all__ = [
    "BackendUnavailable",
    "adamw_step",
    "adamw_step_ref",
    "apply_rotary",
    "apply_rotary_qk",
    "apply_rotary_ref",
    "fused_reward_loss",
    "fused_reward_loss_ref",
    "gather_scored_rows",
    "mrope_cos_sin",
    "resolve_backend",
    "reward_scores",
    "rms_norm",
    "rms_norm_ref",
    "rope_inv_freq",
    "set_default_backend",
    "swiglu",
    "swiglu_ref",
    "varlen_attention",
    "varlen_attention_ref",
    "vision_rope_cos_sin",
]
