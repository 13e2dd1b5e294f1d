"""Triton kernels behind :func:`vlr_kernels.varlen_attention`: varlen_triton (kernels) and varlen_tiles."""
