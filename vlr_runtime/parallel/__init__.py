"""Process groups, device/backend selection and the CPU compatibility layer for megatron-core.

``setup_distributed(tp, pp, vpp=1)`` is the only entry point that creates groups; everything else reads the returned
:class:`ParallelContext` (or :func:`get_context`). ``forward_backward(model, microbatches)`` is one training (or,
``forward_only``, eval) step for any pipeline size (megatron-core's 1F1B / interleaved schedules when pp > 1).
``wrap_ddp_and_optimizer(model, lr=...)`` wraps a stage (or its virtual chunks) in megatron's DDP and builds
megatron's (distributed) AdamW; ``step_if_finite(optimizer)`` steps it unless the global grad norm is NaN/Inf.
"""

from vlr_runtime.parallel.context import ParallelContext, get_context, setup_distributed, teardown
from vlr_runtime.parallel.optimizer import step_if_finite, wrap_ddp_and_optimizer
from vlr_runtime.parallel.pipeline import MicrobatchResult, forward_backward

__all__ = ["MicrobatchResult", "ParallelContext", "forward_backward", "get_context", "setup_distributed",
           "step_if_finite", "teardown", "wrap_ddp_and_optimizer"]
