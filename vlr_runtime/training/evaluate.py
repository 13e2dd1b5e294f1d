"""Held-out pairwise accuracy: every data-parallel rank scores its share of the batches, counts are summed."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlr_runtime.model import RewardModel
from vlr_runtime.training.data import EvalSet


@torch.no_grad()
def evaluate(model: RewardModel, sets: list[EvalSet], *, device: torch.device, dp_rank: int, dp: int,
             dp_group: dist.ProcessGroup | None) -> dict[str, float]:
    """Accuracy (``r_chosen > r_rejected``), mean BT loss and mean margin of each set.

    Returns for the set named ``eval``: ``accuracy``, ``loss``, ``margin``, ``pairs``, ``accuracy_image``,
    ``accuracy_text`` (when it holds such pairs); for any other set ``s``: ``accuracy_<s>``. Ties count as wrong.
    """
    out: dict[str, float] = {}
    for es in sets:
        # [pairs, correct, loss_sum, margin_sum, image_pairs, image_correct, text_pairs, text_correct]
        acc = torch.zeros(8, dtype=torch.float64)
        for b in range(dp_rank, len(es.batches), dp):
            batch, has_image = es.batches[b]
            rewards = model.rewards(batch.to(device)).float().cpu()
            margin = rewards[batch.pair_index[:, 0]] - rewards[batch.pair_index[:, 1]]
            correct = margin > 0
            acc += torch.tensor([
                margin.numel(), correct.sum(), -F.logsigmoid(margin).sum(), margin.sum(),
                has_image.sum(), (correct & has_image).sum(), (~has_image).sum(), (correct & ~has_image).sum(),
            ], dtype=torch.float64)
        if dp > 1:
            acc = acc.to(device)
            dist.all_reduce(acc, group=dp_group)
            acc = acc.cpu()
        pairs, correct, loss, margin, n_img, c_img, n_txt, c_txt = acc.tolist()
        if es.name == "eval":
            out.update(accuracy=correct / pairs, loss=loss / pairs, margin=margin / pairs, pairs=int(pairs))
            if n_img:
                out["accuracy_image"] = c_img / n_img
            if n_txt:
                out["accuracy_text"] = c_txt / n_txt
        else:
            out[f"accuracy_{es.name}"] = correct / pairs
    return out
