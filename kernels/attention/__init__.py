"""Triton kernels behind :func:`vlr_kernels.varlen_attention` (varlen_triton) and their tile helpers (varlen_tiles)."""
