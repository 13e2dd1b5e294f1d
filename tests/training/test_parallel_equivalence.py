"""The trainer's gradient step is layout-independent: TP=2 (two gloo processes) and DP=2 give the loss, the
gradients (gathered to full HF tensors) and the global gradient norm of TP=1 on the same 8 pairs (fp32, <= 1e-5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.parallel.helpers import spawn
from tests.training.helpers import run_args

pytestmark = pytest.mark.slow
TIMEOUT_S = 240


def _worker(rank: int, out: Path, tp: int) -> None:
    """Run by :func:`tests.parallel.helpers.spawn` in each process (env and error files set there); ``out`` is this
    layout's folder inside the test's tmp folder, which holds the shared synthetic data cache."""
    from tests.parallel.test_tensor_parallel import full_grads
    from vlr_runtime.config import parse_args
    from vlr_runtime.data.collate import collate
    from vlr_runtime.data.formats import RowIndex, example_from_row
    from vlr_runtime.parallel import teardown
    from vlr_runtime.training import Trainer

    tmp = out.parent
    cfg = parse_args(run_args(tmp, "--parallel.tp", str(tp), "--run.dir", str(out / "run"),
                              "--train.center_coef", "0.05"))
    trainer = Trainer(cfg)
    pre = trainer.preprocessor
    index = RowIndex(str(next((tmp / "cache").glob("synthetic-*")) / "train.jsonl"))
    rows = [example_from_row(index, i) for i in range(len(index))]
    # 6 image pairs and 2 text-only pairs: the vision tower, the merger and the text path all get gradients.
    chosen = [r for r in rows if r.images][:6] + [r for r in rows if not r.images][:2]
    micro = [collate([pre(r) for r in chosen[k::2]], image_token_id=pre.image_token_id) for k in range(2)]
    ctx = trainer.ctx
    mine = micro if ctx.dp == 1 else [micro[ctx.dp_rank]]
    stats = trainer.compute_gradients([(mb, 4) for mb in mine], global_pairs=8)
    grads = full_grads(trainer.model)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in grads.items()}, str(out / "grads.safetensors"))
        (out / "stats.json").write_text(json.dumps(stats))
    teardown()


def _launch(tmp: Path, world: int, tp: int, tag: str) -> tuple[dict, dict]:
    spawn(_worker, world, tmp / tag, TIMEOUT_S, tp=tp)
    return json.loads((tmp / tag / "stats.json").read_text()), load_file(str(tmp / tag / "grads.safetensors"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error ||a - b|| / ||b|| (element-wise ratios of fp32 sums in other orders are noise)."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def test_tp2_and_dp2_match_tp1(tmp_path):
    ref_stats, ref_grads = _launch(tmp_path, 1, 1, "tp1")
    assert ref_stats["pairs"] == 8 and ref_stats["images"] == 6
    for tag, world, tp in (("tp2", 2, 2), ("dp2", 2, 1)):
        stats, grads = _launch(tmp_path, world, tp, tag)
        assert stats["pairs"] == 8, tag
        for key in ("loss", "grad_norm", "chosen_reward", "rejected_reward"):
            assert abs(stats[key] - ref_stats[key]) <= 1e-5 * max(abs(ref_stats[key]), 1e-6), (tag, key)
        # the margin is a difference of rewards: its error scales with the rewards, not with itself
        scale = max(abs(ref_stats["chosen_reward"]), abs(ref_stats["rejected_reward"]))
        assert abs(stats["margin"] - ref_stats["margin"]) <= 1e-5 * scale, tag
        assert stats["accuracy"] == ref_stats["accuracy"]
        assert grads.keys() == ref_grads.keys()
        names = sorted(ref_grads)
        whole = _rel(torch.cat([grads[n].reshape(-1) for n in names]),
                     torch.cat([ref_grads[n].reshape(-1) for n in names]))
        assert whole <= 1e-5, (tag, whole)
        for name in names:
            g = ref_grads[name]
            assert g.abs().max() > 0, name  # every parameter took part (a zero gradient would hide a bug)
            # per tensor, small tensors (norm weights) sit closer to fp32 noise than the whole gradient
            assert _rel(grads[name], g) <= 5e-5, (tag, name, _rel(grads[name], g))
