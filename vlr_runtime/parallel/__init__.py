"""Process groups, device/backend selection and the CPU compatibility layer for megatron-core.

``setup_distributed(tp, pp)`` is the only entry point that creates groups; everything else reads the returned
:class:`ParallelContext` (or :func:`get_context`). ``forward_backward(model, microbatches)`` is one training (or,
``forward_only``, eval) step for any pipeline size.
"""

from vlr_runtime.parallel.context import ParallelContext, get_context, setup_distributed, teardown
from vlr_runtime.parallel.pipeline import MicrobatchResult, forward_backward

__all__ = ["MicrobatchResult", "ParallelContext", "forward_backward", "get_context", "setup_distributed", "teardown"]
