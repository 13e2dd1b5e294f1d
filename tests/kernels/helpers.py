"""Shared assertions for the kernel tests: float64 references, a per-dtype tolerance table, the bf16 rule."""

from __future__ import annotations

import torch

# (atol, rtol) of a kernel output against the float64 reference, by the kernel's input dtype
TOLERANCE = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 5e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def to64(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """float64 leaf copies (requires_grad where the original had it) for the reference pass."""
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def assert_close64(actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype, what: str, scale: float = 1.0):
    """``actual`` (any dtype) matches the float64 ``expected64`` within the tolerance of ``dtype``; ``scale``
    widens the absolute part for quantities that sum many rounded terms (e.g. weight gradients)."""
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected64.double(), atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}")


def assert_bf16_rule(kernel: torch.Tensor, torch_bf16: torch.Tensor, ref64: torch.Tensor, what: str,
                     floor: float = 1e-3):
    """design.md: err(kernel, fp64 ref) <= 2 * err(plain torch in bf16, fp64 ref) + a small absolute floor."""
    err_k = (kernel.double() - ref64.double()).abs().max().item()
    err_t = (torch_bf16.double() - ref64.double()).abs().max().item()
    assert err_k <= 2 * err_t + floor, f"{what}: kernel err {err_k:.3e} > 2 * torch-bf16 err {err_t:.3e} + {floor}"


# The launch tiles that were "new" (never run on a GPU) until H200 run E ran and timed them, by head-dim class,
# kernel and index in varlen_tiles._TABLES: the tests of the new-candidate machinery (VLR_ATTN_NEW, the probe's
# verdict) mark them new again, so that they keep exercising it on the real tables' shapes.
_RUN_E_TILES = {96: {"dkdv": range(3, 11), "dq": range(3, 5)}, 128: {"dkdv": (9, 10), "dq": (5, 6)}}
# ...and those new until H200 run G: the 3-stage 128x64 dQ tile with the shared-prompt mask, and nine persistent
# window backward configurations (varlen_windows.window_key: programs per SM, stages, warps, RECOMPUTE, KV_MAJOR)
_RUN_G_SHARED_TILES = {128: {"dq": (6,)}}
RUN_G_WINDOWS = frozenset({(2, 2, 4, 1, 0), (1, 3, 16, 1, 0), (1, 2, 16, 1, 0)}
                          | {(1, stages, 8, r, kv) for stages in (3, 4) for r, kv in ((2, 0), (0, 1), (2, 1))})


def pretend_new_tiles(monkeypatch) -> None:
    """Mark the run-E tiles of ``varlen_tiles._TABLES``, and the candidates run G ran first, new for this test
    (``monkeypatch`` undoes it)."""
    from vlr_kernels.attention import varlen_tiles as vt
    from vlr_kernels.attention import varlen_windows as vw

    tables = {cls: {kernel: tuple(t._replace(new=True) if i in _RUN_E_TILES.get(cls, {}).get(kernel, ()) else t
                                  for i, t in enumerate(tiles)) for kernel, tiles in kinds.items()}
              for cls, kinds in vt._TABLES.items()}
    assert sum(t.new for kinds in tables.values() for tiles in kinds.values() for t in tiles) == 14
    for cls, kinds in _RUN_G_SHARED_TILES.items():
        for kernel, idx in kinds.items():
            tables[cls][kernel] = tuple(t._replace(shared_new=True) if i in idx else t
                                        for i, t in enumerate(tables[cls][kernel]))
    monkeypatch.setattr(vt, "_TABLES", tables)
    monkeypatch.setattr(vw, "_NEW_WINDOWS", RUN_G_WINDOWS)
