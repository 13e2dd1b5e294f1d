"""Data-path index computations: ours (C++ and vectorised Python) against transformers' Python implementations.

Workloads (a realistic Qwen2.5-VL-7B training batch):

* ``mrope_positions``: 16 sequences (8 pairs) of ~1-2.5k tokens, each with one image of a common photo size, packed;
  transformers: ``Qwen2_5_VLModel.get_rope_index`` on the right-padded batch with its attention mask.
* ``vision_windows``: the window index + cu_window_seqlens of 8 images of common photo sizes (35,800 patches);
  transformers: ``transformers.vision_utils.get_vision_window_index`` (+ ``argsort`` for the inverse permutation).
* ``step_plan``: balancing 512 pairs over 8 ranks + packing into microbatches (no transformers counterpart).

Run: ``python benchmarks/bench_data.py [--quick] [--csv F]``; prints a markdown table and the speed-ups.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Row, append_csv, base_parser, env_info, markdown_table, time_ms, want  # noqa: E402

from vlr_runtime.data import native  # noqa: E402
from vlr_runtime.data.packing import pack_microbatches  # noqa: E402
from vlr_runtime.data.positions import mrope_position_ids  # noqa: E402
from vlr_runtime.data.windows import vision_window_index  # noqa: E402

IMAGE_TOKEN_ID = 151655
# Patch grids (h, w) of 8 common photo sizes after smart_resize with the default max_pixels (35,800 patches).
GRIDS_8 = [(76, 100), (64, 86), (100, 76), (56, 74), (42, 56), (28, 38), (36, 48), (66, 88)]


def _scale(grids: list[tuple[int, int]], quick: bool) -> torch.Tensor:
    if quick:
        grids = [(max(2, h // 4 // 2 * 2), max(2, w // 4 // 2 * 2)) for h, w in grids]
    return torch.tensor([[1, h, w] for h, w in grids], dtype=torch.int64)


def _rope_batch(quick: bool, rng: np.random.Generator):
    grids = _scale(GRIDS_8, quick)
    seqs, seq_grids = [], []
    for k in range(16):
        g = grids[k % 8]
        n_img = int(g.prod()) // 4
        ids = rng.integers(0, 150000, int(rng.integers(30, 200))).tolist()
        ids += [151652] + [IMAGE_TOKEN_ID] * n_img + [151653]
        ids += rng.integers(0, 150000, int(rng.integers(50, 600 if not quick else 80))).tolist()
        seqs.append(ids)
        seq_grids.append(g)
    return seqs, torch.stack(seq_grids)


def _hf_rope(seqs: list[list[int]], grids: torch.Tensor):
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    fake = SimpleNamespace(
        config=Qwen2_5_VLConfig(),
        get_vision_position_ids=lambda *a, **k: Qwen2_5_VLModel.get_vision_position_ids(None, *a, **k),
    )
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.int64)
    mask = torch.zeros(len(seqs), width, dtype=torch.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    mm = (ids == IMAGE_TOKEN_ID).to(torch.int32)
    return lambda: Qwen2_5_VLModel.get_rope_index(fake, ids, mm, image_grid_thw=grids, attention_mask=mask)


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    args = p.parse_args()
    device = torch.device("cpu")
    env = env_info(device)
    rep = 5 if args.quick else args.rep
    rng = np.random.default_rng(0)
    rows: list[Row] = []
    p50: dict[tuple[str, str], float] = {}

    def record(kernel: str, provider: str, x: str, fn) -> None:
        if not want(provider, args.providers):
            return
        if provider == "native" and not native.available():
            print(f"skip {kernel}/native: vlr_runtime._C not built")
            return
        t50, t20, t80 = time_ms(fn, device, warmup=2, rep=rep)
        p50[(kernel, provider)] = t50
        rows.append(Row(kernel, provider, "index", "ms", x, t50, t20, t80, **env))

    seqs, grids = _rope_batch(args.quick, rng)
    packed = torch.tensor([t for s in seqs for t in s])
    cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    x = f"{len(seqs)} seqs, {packed.numel()} tokens"
    record("mrope_positions", "transformers", x, _hf_rope(seqs, grids))
    for provider in ("python", "native"):
        record("mrope_positions", provider, x, lambda b=provider: mrope_position_ids(
            packed, cu, grids, image_token_id=IMAGE_TOKEN_ID, backend=b))

    vgrids = _scale(GRIDS_8, args.quick)
    x = f"{len(vgrids)} images, {int(vgrids.prod(-1).sum())} patches"

    def hf_windows():
        from transformers.vision_utils import get_vision_window_index

        index, cu_w = get_vision_window_index(vgrids, spatial_merge_size=2, window_size=112, patch_size=14)
        return index, torch.argsort(index), cu_w

    record("vision_windows", "transformers", x, hf_windows)
    for provider in ("python", "native"):
        record("vision_windows", provider, x, lambda b=provider: vision_window_index(vgrids, backend=b))

    n = 64 if args.quick else 512
    tokens = rng.integers(200, 2500, n).tolist()
    patches = np.minimum(rng.pareto(1.2, n) * 400 + 64, 16384).astype(int).tolist()
    x = f"{n} pairs, 8 ranks"
    for provider in ("python", "native"):
        record("step_plan", provider, x, lambda b=provider: pack_microbatches(
            tokens, patches, num_ranks=8, token_budget=16384, backend=b))

    print(markdown_table(rows, env))
    for kernel in ("mrope_positions", "vision_windows"):
        ref = p50.get((kernel, "transformers"))
        for provider in ("python", "native"):
            if ref and (kernel, provider) in p50:
                print(f"{kernel}: {provider} is {ref / p50[(kernel, provider)]:.1f}x faster than transformers")
    if "step_plan" in {k for k, _ in p50} and ("step_plan", "native") in p50 and ("step_plan", "python") in p50:
        print(f"step_plan: native is {p50[('step_plan', 'python')] / p50[('step_plan', 'native')]:.1f}x faster "
              "than python")
    append_csv(args.csv, rows)


if __name__ == "__main__":
    main()
