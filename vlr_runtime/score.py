"""Batch scoring + benchmark metrics:

    python -m vlr_runtime.score --model DIR --data FILE.jsonl --out OUT.jsonl [--dtype float32|bfloat16]
        [--batch-tokens N] [--tp N] [--shared-prompt] [--max-length N]

also under ``torchrun --nproc-per-node K`` (``K`` a multiple of ``--tp``; rows are spread over the ``K / tp``
data-parallel groups, every TP group scores its rows together).

Input: the pair rows and VL-RewardBench rows of :mod:`vlr_runtime.data.formats` (image paths relative to the data
file), JSONL or Parquet, a file, directory or glob. Output: one JSON line per input row, in input order:
``{"id", "chosen_score", "rejected_score"}`` for a pair, ``{"id", "scores", "category"}`` for a VL-RewardBench row,
``{"id", "error"}`` for a row that cannot be scored (the run goes on; ``error`` starts with the reason code of
:data:`vlr_runtime.data.errors.REASONS`).

Printed at the end (rank 0): pairwise accuracy (``chosen_score > rejected_score``; ties count as wrong), per
category when the pairs carry one (RewardBench ``subset``); for VL-RewardBench rows the accuracy per category (a row
is right when its top-scored response is one the humans ranked best) and the macro average over categories; the last
line is ``metrics: {json}`` with the same numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

from vlr_runtime.data.collate import ProcessedExample
from vlr_runtime.data.errors import DataError
from vlr_runtime.data.formats import read_examples

log = logging.getLogger(__name__)


def _record(ex: ProcessedExample, scores: list[float]) -> dict:
    if ex.is_pair:
        return {"id": ex.id, "chosen_score": scores[0], "rejected_score": scores[1], "category": ex.category}
    return {"id": ex.id, "scores": scores, "category": ex.category, "human_ranking": ex.human_ranking}


def score_rows(scorer, data: str | Path, *, dp_rank: int = 0, dp_size: int = 1) -> Iterator[tuple[int, dict]]:
    """Score the rows of ``data`` owned by this data-parallel rank (row ``i`` -> rank ``i % dp_size``).

    Yields ``(row number, record)`` with internal fields ``category``/``human_ranking`` still attached (see
    :func:`public_record`). Rows are preprocessed as they are read and scored in packed batches of at most
    ``scorer.batch_tokens`` tokens, so memory stays bounded by one batch.
    """
    pending: list[tuple[int, ProcessedExample]] = []
    pending_tokens = 0

    def flush() -> Iterator[tuple[int, dict]]:
        scores = scorer.score_examples([ex for _, ex in pending])
        for (i, ex), s in zip(pending, scores):
            yield i, _record(ex, s)

    for i, (row_id, example) in enumerate(read_examples(data)):
        if i % dp_size != dp_rank:
            continue
        try:
            if isinstance(example, DataError):
                raise example
            processed = scorer.preprocessor(example)
        except DataError as e:
            yield i, {"id": row_id, "error": str(e)}
            continue
        n = processed.num_tokens(scorer.shared_prompt)
        if pending and pending_tokens + n > scorer.batch_tokens:
            yield from flush()
            pending, pending_tokens = [], 0
        pending.append((i, processed))
        pending_tokens += n
    if pending:
        yield from flush()


def public_record(record: dict) -> dict:
    """The output line of a record: ``id`` + scores (+ ``category`` for VL-RewardBench rows) or ``error``."""
    if "error" in record:
        return {"id": record["id"], "error": record["error"]}
    if "scores" in record:
        return {"id": record["id"], "scores": record["scores"], "category": record["category"]}
    return {"id": record["id"], "chosen_score": record["chosen_score"], "rejected_score": record["rejected_score"]}


def compute_metrics(records: list[dict]) -> dict:
    """Accuracy figures over scored records (see the module docstring); error counts by reason."""
    errors = Counter(r["error"].split(":", 1)[0] for r in records if "error" in r)
    pair_hits: dict[str, list[bool]] = defaultdict(list)
    rank_hits: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        if "chosen_score" in r:
            pair_hits[r["category"]].append(r["chosen_score"] > r["rejected_score"])
        elif "scores" in r:
            best = min(r["human_ranking"])
            top = max(range(len(r["scores"])), key=lambda k: r["scores"][k])
            rank_hits[r["category"]].append(r["human_ranking"][top] == best)
    out: dict = {"rows": len(records), "scored": len(records) - sum(errors.values()), "errors": dict(errors)}
    all_pairs = [h for hits in pair_hits.values() for h in hits]
    if all_pairs:
        out["pairs"] = len(all_pairs)
        out["pair_accuracy"] = sum(all_pairs) / len(all_pairs)
        if set(pair_hits) != {""}:
            out["pair_accuracy_by_category"] = {c: sum(h) / len(h) for c, h in sorted(pair_hits.items())}
    if rank_hits:
        by_cat = {c: sum(h) / len(h) for c, h in sorted(rank_hits.items())}
        all_rank = [h for hits in rank_hits.values() for h in hits]
        out["vlrb_rows"] = len(all_rank)
        out["vlrb_accuracy_by_category"] = by_cat
        out["vlrb_macro_accuracy"] = sum(by_cat.values()) / len(by_cat)
        out["vlrb_overall_accuracy"] = sum(all_rank) / len(all_rank)
    return out


def format_metrics(m: dict) -> str:
    lines = [f"scored {m['scored']}/{m['rows']} rows"
             + (f"; errors: {', '.join(f'{k} {v}' for k, v in sorted(m['errors'].items()))}" if m["errors"] else "")]
    if "pair_accuracy" in m:
        lines.append(f"pairwise accuracy: {m['pair_accuracy']:.4f} ({m['pairs']} pairs)")
        for cat, acc in m.get("pair_accuracy_by_category", {}).items():
            lines.append(f"  {cat or '(none)':<32} {acc:.4f}")
    if "vlrb_accuracy_by_category" in m:
        lines.append(f"VL-RewardBench accuracy ({m['vlrb_rows']} rows):")
        for cat, acc in m["vlrb_accuracy_by_category"].items():
            lines.append(f"  {cat:<32} {acc:.4f}")
        lines.append(f"  {'macro average':<32} {m['vlrb_macro_accuracy']:.4f}")
        lines.append(f"  {'overall':<32} {m['vlrb_overall_accuracy']:.4f}")
    lines.append("metrics: " + json.dumps(m, sort_keys=True))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vlr_runtime.score", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF Qwen2.5-VL directory with a reward head")
    p.add_argument("--data", required=True, help="JSONL/Parquet file, directory or glob of pair / VL-RewardBench rows")
    p.add_argument("--out", required=True, help="output JSONL, one line per input row")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-tokens", type=int, default=16384, help="LLM tokens per packed forward")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (run under torchrun)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: CUDA when available")
    p.add_argument("--shared-prompt", action="store_true",
                   help="pack each pair as [prompt | chosen | rejected], computing the prompt once")
    p.add_argument("--max-length", type=int, default=None, help="per-sequence token limit; longer rows -> error")
    p.add_argument("--kernel-backend", default=None, choices=["torch", "triton", "cuda", "flash_attn"],
                   help="force one backend for every vlr_kernels op (default: automatic per op and device)")
    args = p.parse_args(argv)
    if args.batch_tokens <= 0:
        p.error("--batch-tokens must be positive")
    if args.tp < 1:
        p.error("--tp must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 when the file was read, whatever rows failed)."""
    import torch.distributed as dist
    from vlr_kernels import set_default_backend

    from vlr_runtime.parallel import teardown
    from vlr_runtime.scorer import RewardScorer

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    set_default_backend(args.kernel_backend)
    try:
        scorer = RewardScorer(args.model, dtype=args.dtype, device=args.device, batch_tokens=args.batch_tokens,
                              tp=args.tp, shared_prompt=args.shared_prompt, max_length=args.max_length)
        ctx = scorer.context
        start = time.perf_counter()
        mine = list(score_rows(scorer, args.data, dp_rank=ctx.dp_rank, dp_size=ctx.dp))
        if ctx.world_size > 1:
            gathered: list | None = [None] * ctx.world_size if ctx.rank == 0 else None
            # Only one rank per TP group contributes, so rows are not duplicated.
            dist.gather_object(mine if ctx.tp_rank == 0 else [], gathered, dst=0)
            results = [item for part in (gathered or []) for item in part]
        else:
            results = mine
        if ctx.rank == 0:
            records = [r for _, r in sorted(results, key=lambda x: x[0])]
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(public_record(r)) + "\n")
            log.info("%d rows scored in %.1f s -> %s", len(records), time.perf_counter() - start, out)
            print(format_metrics(compute_metrics(records)), flush=True)
    finally:
        teardown()
        set_default_backend(None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
