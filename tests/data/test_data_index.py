"""M-RoPE positions and vision window metadata against transformers' own implementations."""

from __future__ import annotations

import random

import pytest
import torch

from tests.data.hf_reference import (
    IMAGE_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    hf_rope_index,
    hf_vision_position_ids,
    hf_window_index,
)
from vlr_runtime.data import native
from vlr_runtime.data.positions import mrope_position_ids
from vlr_runtime.data.windows import vision_cu_seqlens, vision_windows


def _random_grid(rng: random.Random, t_max: int = 1) -> list[int]:
    return [rng.randint(1, t_max), 2 * rng.randint(1, 13), 2 * rng.randint(1, 13)]


def _random_sequence(rng: random.Random, n_images: int) -> tuple[list[int], list[list[int]]]:
    ids: list[int] = [rng.randint(0, 1000) for _ in range(rng.randint(0, 5))]
    grids = []
    for _ in range(n_images):
        g = _random_grid(rng, t_max=2)
        grids.append(g)
        ids += [VISION_START_ID] + [IMAGE_TOKEN_ID] * (g[0] * g[1] * g[2] // 4) + [VISION_END_ID]
        ids += [rng.randint(0, 1000) for _ in range(rng.randint(0, 6))]
    ids.append(rng.randint(0, 1000))
    return ids, grids


@pytest.mark.parametrize("backend", ["python", None])
@pytest.mark.parametrize("seed", range(6))
def test_packed_positions_match_hf_per_sequence(seed: int, backend: str | None) -> None:
    rng = random.Random(seed)
    seqs = [_random_sequence(rng, rng.randint(0, 3)) for _ in range(rng.randint(1, 5))]
    ids = torch.tensor([t for s, _ in seqs for t in s])
    cu = torch.tensor([0] + [len(s) for s, _ in seqs]).cumsum(0).to(torch.int32)
    grids = torch.tensor([g for _, gs in seqs for g in gs], dtype=torch.int64).reshape(-1, 3)
    ours = mrope_position_ids(ids, cu, grids, image_token_id=IMAGE_TOKEN_ID, backend=backend)
    for i, (s, gs) in enumerate(seqs):
        ref = hf_rope_index(torch.tensor(s), torch.tensor(gs).reshape(-1, 3) if gs else None)
        torch.testing.assert_close(ours[:, cu[i] : cu[i + 1]], ref, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["python", None])
@pytest.mark.parametrize("seed", range(4))
def test_shared_prompt_rejected_restarts_after_prompt(seed: int, backend: str | None) -> None:
    rng = random.Random(100 + seed)
    segs, grids, pre, spl = [], [], [], []
    refs = []
    for _ in range(3):
        prompt, pg = _random_sequence(rng, rng.randint(0, 2))
        chosen, cg = _random_sequence(rng, rng.randint(0, 1))
        rejected, rg = _random_sequence(rng, rng.randint(0, 1))
        segs.append(prompt + chosen + rejected)
        grids += pg + cg + rg
        pre.append(len(prompt))
        spl.append(len(prompt) + len(chosen))
        ref_c = hf_rope_index(torch.tensor(prompt + chosen), torch.tensor(pg + cg).reshape(-1, 3) if pg + cg else None)
        grid_r = torch.tensor(pg + rg).reshape(-1, 3) if pg + rg else None
        ref_r = hf_rope_index(torch.tensor(prompt + rejected), grid_r)
        refs.append(torch.cat([ref_c, ref_r[:, len(prompt) :]], dim=1))
    ids = torch.tensor([t for s in segs for t in s])
    cu = torch.tensor([0] + [len(s) for s in segs]).cumsum(0)
    ours = mrope_position_ids(
        ids,
        cu,
        torch.tensor(grids, dtype=torch.int64).reshape(-1, 3),
        image_token_id=IMAGE_TOKEN_ID,
        prefix_lens=torch.tensor(pre),
        split_lens=torch.tensor(spl),
        backend=backend,
    )
    torch.testing.assert_close(ours, torch.cat(refs, dim=1), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["python", "native"])
def test_positions_reject_inconsistent_inputs(backend: str) -> None:
    if backend == "native" and not native.available():
        pytest.skip("vlr_runtime._C not built")
    ids = torch.tensor([1, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 2])
    cu = torch.tensor([0, 4])
    kw = dict(image_token_id=IMAGE_TOKEN_ID, backend=backend)
    with pytest.raises(ValueError, match="image tokens"):
        mrope_position_ids(ids, cu, torch.tensor([[1, 2, 2]]), **kw)
    with pytest.raises(ValueError, match="straddles"):
        mrope_position_ids(ids, torch.tensor([0, 2, 4]), torch.tensor([[1, 2, 4]]), **kw)
    with pytest.raises(ValueError, match="cu_seqlens"):
        mrope_position_ids(ids, torch.tensor([0, 3]), torch.tensor([[1, 2, 4]]), **kw)
    with pytest.raises(ValueError, match="prompt/response boundary"):
        mrope_position_ids(
            ids, cu, torch.tensor([[1, 2, 4]]), prefix_lens=torch.tensor([2]), split_lens=torch.tensor([4]), **kw
        )


@pytest.mark.parametrize("backend", ["python", None])
@pytest.mark.parametrize("seed", range(6))
def test_vision_windows_match_hf(seed: int, backend: str | None) -> None:
    rng = random.Random(seed)
    grid = torch.tensor([_random_grid(rng, t_max=2) for _ in range(rng.randint(1, 6))])
    if seed == 0:
        grid = torch.tensor([[1, 16, 16], [1, 2, 2], [1, 34, 18]])  # exact multiples of the window and a remainder
    ours = vision_windows(grid, backend=backend)
    ref_index, ref_cu = hf_window_index(grid)
    torch.testing.assert_close(ours.window_index, ref_index, rtol=0, atol=0)
    torch.testing.assert_close(ours.cu_window_seqlens, ref_cu, rtol=0, atol=0)
    torch.testing.assert_close(ours.reverse_index, torch.argsort(ref_index), rtol=0, atol=0)
    torch.testing.assert_close(ours.rope_position_ids, hf_vision_position_ids(grid), rtol=0, atol=0)
    ref_full = torch.nn.functional.pad(torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0]).cumsum(0), (1, 0))
    torch.testing.assert_close(vision_cu_seqlens(grid), ref_full.to(torch.int32), rtol=0, atol=0)
    assert ours.max_window_seqlen == int((ref_cu[1:] - ref_cu[:-1]).max())
    assert ours.max_window_seqlen <= 64


def test_windows_reject_bad_grids() -> None:
    with pytest.raises(ValueError, match="multiples"):
        vision_windows(torch.tensor([[1, 3, 4]]))
    with pytest.raises(ValueError, match=r"\[I, 3\]"):
        vision_windows(torch.tensor([1, 4, 4]))
