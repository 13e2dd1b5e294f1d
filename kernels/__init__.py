"""vlr_kernels: Triton/CUDA kernels for multimodal reward-model training, usable without the runtime.

Every op has an eager reference (``<op>_ref``), an autograd Function and a public dispatching function that takes
``backend: str | None`` (see :mod:`vlr_kernels._backend`).
"""

from vlr_kernels._backend import BackendUnavailable, resolve_backend, set_default_backend
from vlr_kernels.varlen_attention import varlen_attention, varlen_attention_ref

__all__ = ["BackendUnavailable", "resolve_backend", "set_default_backend", "varlen_attention", "varlen_attention_ref"]
