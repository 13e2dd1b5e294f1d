"""Process groups, device/backend selection and the CPU compatibility layer for megatron-core.

``setup_distributed(tp, pp)`` is the only entry point that creates groups; everything else reads the returned
:class:`ParallelContext` (or :func:`get_context`).
"""

from vlr_runtime.parallel.context import ParallelContext, get_context, setup_distributed, teardown

__all__ = ["ParallelContext", "get_context", "setup_distributed", "teardown"]
