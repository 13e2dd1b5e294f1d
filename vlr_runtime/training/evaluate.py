"""Held-out pairwise accuracy: every data-parallel rank scores its share of the batches, counts are summed."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlr_runtime.data.types import PackedBatch
from vlr_runtime.model import RewardModel
from vlr_runtime.parallel import forward_backward
from vlr_runtime.training.data import EvalSet


def _all_reduce_sum(values: torch.Tensor, device: torch.device, dp: int, group: dist.ProcessGroup | None) -> list:
    if dp > 1:
        values = values.to(device)
        dist.all_reduce(values, group=group)
    return values.cpu().tolist()


def _rewards(model: RewardModel | list[RewardModel], batches: list[PackedBatch], device: torch.device
             ) -> list[torch.Tensor]:
    """``[S]`` float32 CPU rewards of each batch. Virtual pipeline stages (``model`` a list of chunks): megatron's
    interleaved schedule runs micro-batches in groups of ``pp``, so batches go ``pp`` at a time, the last group
    padded with repeats of its last batch (whose results are dropped)."""
    group = model[0].pp if isinstance(model, list) else 1
    out = []
    for start in range(0, len(batches), group):
        part = [b.to(device) for b in batches[start : start + group]]
        results = forward_backward(model, part + part[-1:] * (group - len(part)), forward_only=True)
        out += [r.rewards.float().cpu() for r in results[: len(part)]]
    return out


@torch.no_grad()
def evaluate(model: RewardModel | list[RewardModel], sets: list[EvalSet], *, device: torch.device, dp_rank: int,
             dp: int, dp_group: dist.ProcessGroup | None) -> dict:
    """Accuracy (``r_chosen > r_rejected``; ties count as wrong), mean BT loss and mean margin of each set.

    Returns for the set named ``eval``: ``accuracy``, ``loss``, ``margin``, ``pairs``, ``accuracy_image`` /
    ``accuracy_text`` (when it holds such pairs) and ``accuracy_by_category`` (rows with a ``category``);
    for any other set ``s``: ``accuracy_<s>``. Collective over the DP group (same sets on every rank) and, with
    pipeline stages, over the pipeline (every stage runs every batch; the last stage's rewards are broadcast).
    ``model``: this rank's stage, or the list of its virtual stage chunks.
    """
    out: dict = {}
    for es in sets:
        categories = sorted({c for _, _, cats in es.batches for c in cats if c})
        # [pairs, correct, loss_sum, margin_sum, image_pairs, image_correct, text_pairs, text_correct]
        # then (pairs, correct) per category
        acc = torch.zeros(8 + 2 * len(categories), dtype=torch.float64)
        mine = es.batches[dp_rank::dp]
        for (batch, has_image, cats), rewards in zip(mine, _rewards(model, [b for b, _, _ in mine], device)):
            margin = rewards[batch.pair_index[:, 0]] - rewards[batch.pair_index[:, 1]]
            correct = margin > 0
            acc[:8] += torch.tensor([
                margin.numel(), correct.sum(), -F.logsigmoid(margin).sum(), margin.sum(),
                has_image.sum(), (correct & has_image).sum(), (~has_image).sum(), (correct & ~has_image).sum(),
            ], dtype=torch.float64)
            for c, ok in zip(cats, correct.tolist()):
                if c:
                    k = 8 + 2 * categories.index(c)
                    acc[k] += 1
                    acc[k + 1] += ok
        totals = _all_reduce_sum(acc, device, dp, dp_group)
        pairs, correct, loss, margin, n_img, c_img, n_txt, c_txt = totals[:8]
        if es.name == "eval":
            out.update(accuracy=correct / pairs, loss=loss / pairs, margin=margin / pairs, pairs=int(pairs))
            if n_img:
                out["accuracy_image"] = c_img / n_img
            if n_txt:
                out["accuracy_text"] = c_txt / n_txt
            if categories:
                out["accuracy_by_category"] = {
                    c: totals[9 + 2 * i] / totals[8 + 2 * i] for i, c in enumerate(categories)}
        else:
            out[f"accuracy_{es.name}"] = correct / pairs
    return out
