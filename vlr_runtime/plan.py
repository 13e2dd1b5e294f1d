"""``python -m vlr_runtime.plan``: per-GPU memory and step-time estimates for candidate TP/PP/DP layouts.

Memory model (bytes per GPU, bf16 weights, Adam), for the two optimizer paths of the trainer:
* weights: 2 B per parameter held by the rank (vision tower and merger live on the first pipeline stage, the reward
  head on the last; LLM layers split evenly over stages; everything split over TP);
* optimizer: 12 B per trained parameter (fp32 master copy + two Adam moments), divided by DP with the distributed
  optimizer;
* gradients: with ``distributed_optimizer`` (megatron DDP) 4 B per *trained* parameter held (fp32 main-grad buffer);
  without it (the trainer's ``MasterAdamW``) 2 B (autograd's gradients in the parameter dtype);
* optimizer-step transient: torch's multi-tensor AdamW (what runs without Transformer Engine / apex) allocates
  ``sqrt(v)`` for every parameter it updates at once (4 B per fp32 master element, on this rank's DP shard with the
  distributed optimizer); ``MasterAdamW`` on CUDA (one fused Triton pass per parameter that reads the 16-bit
  gradient directly) allocates nothing per element (its torch path, ``VLR_FUSED_ADAMW=0``, would hold fp32 copies
  of all gradients: 4 B);
* activations of one microbatch per LLM layer and token, in bf16, with FlashAttention (no s x s scores kept):
  none recompute -> inputs of both norms and their outputs, q/k/v, attention output, gate/up outputs and their product:
  ``5h + (h + 2·kv·hd) + 3·I`` elements; selective recompute (attention core recomputed) keeps the same here because
  flash attention already stores no scores; full recompute -> only the layer input (h). Divided by TP with sequence
  parallel, otherwise the norm/residual part (4h) is replicated. On the first stage of a 1F1B pipeline up to ``pp``
  microbatches are in flight.
* the frozen vision tower runs without grad: only its largest transient (one block's working set for all patches of a
  microbatch) counts, plus the merger's saved input;
* a fixed ``overhead_gib`` for the CUDA context, NCCL buffers and allocator slack.

Activations are freed by the end of the backward pass, before the optimizer step, so the peak is
``weights + optimizer + gradients + max(activations, optimizer-step transient) + overhead``.

Step time: model FLOPs (``vlr_runtime.flops``) over ``gpus x peak x efficiency``, stretched by the pipeline bubble
``(pp-1)/(m+pp-1)`` and a TP communication penalty. These are planning numbers: the GPU benchmark compares the memory
estimate with the measured peak.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from vlr_runtime.flops import training_step_flops

GIB = 1024**3


@dataclass(kw_only=True)
class Workload:
    """What one optimizer step processes, per data-parallel replica."""

    micro_batch_tokens: int = 4096
    """Packed LLM tokens per microbatch."""
    micro_batch_patches: int = 4096
    """Vision patches per microbatch (before the 2x2 merge)."""
    microbatches: int = 8
    """Microbatches per optimizer step and replica (gradient accumulation / pipeline microbatches)."""
    recompute: str = "none"
    """Activation recomputation of the LLM: ``none``, ``selective`` or ``full``."""
    vision_trained: bool = False
    merger_trained: bool = True
    sequence_parallel: bool = True
    distributed_optimizer: bool = True
    """The trainer's ``parallel.distributed_optimizer``: megatron DDP + the DP-sharded optimizer; False: its
    ``MasterAdamW`` (replicated, gradients all-reduced)."""


@dataclass(kw_only=True)
class Estimate:
    tp: int
    pp: int
    dp: int
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    optimizer_step_gib: float
    """Transient of the optimizer step (not at the same time as the activations)."""
    total_gib: float
    step_time_s: float
    tokens_per_s: float
    fits: bool


def _text(cfg: Mapping) -> Mapping:
    return cfg.get("text_config") or cfg


def parameter_counts(cfg: Mapping) -> dict[str, int]:
    """Parameters of the reward model by group (vision tower, merger, LLM without LM head, head), from the HF config."""
    t = _text(cfg)
    v = cfg["vision_config"]
    h, inter, layers = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    heads = t["num_attention_heads"]
    kv = t.get("num_key_value_heads", heads)
    hd = t.get("head_dim") or h // heads
    layer = (h * heads * hd + heads * hd) + 2 * (h * kv * hd + kv * hd) + heads * hd * h + 3 * h * inter + 2 * h
    llm = t["vocab_size"] * h + layers * layer + h
    c, vi, depth = v["hidden_size"], v["intermediate_size"], v["depth"]
    patch_in = v.get("in_channels", 3) * v.get("temporal_patch_size", 2) * v.get("patch_size", 14) ** 2
    block = 2 * c + (3 * c * c + 3 * c) + (c * c + c) + 2 * (c * vi + vi) + (vi * c + c)
    vision = patch_in * c + depth * block
    mc = c * v.get("spatial_merge_size", 2) ** 2
    out = v.get("out_hidden_size", h)
    merger = c + (mc * mc + mc) + (mc * out + out)
    return {"vision": vision, "merger": merger, "llm": llm, "head": h + 1}


def estimate(
    cfg: Mapping, work: Workload, *, tp: int, pp: int, dp: int, gpu_mem_gib: float,
    peak_flops: float = 989e12, efficiency: float = 0.45, overhead_gib: float = 3.0,
) -> Estimate:
    """Per-GPU memory and step time of one layout (the most loaded pipeline stage)."""
    t = _text(cfg)
    v = cfg["vision_config"]
    counts = parameter_counts(cfg)
    layers = t["num_hidden_layers"]
    h, inter = t["hidden_size"], t["intermediate_size"]
    heads = t["num_attention_heads"]
    kv = t.get("num_key_value_heads", heads)
    hd = t.get("head_dim") or h // heads
    embed = t["vocab_size"] * h
    per_layer = (counts["llm"] - embed - h) / layers
    stage_layers = -(-layers // pp)

    # the first stage holds embedding + vision + merger; the last holds the final norm + head
    first = {"vision": counts["vision"], "merger": counts["merger"], "llm": embed + stage_layers * per_layer}
    if pp == 1:
        first["llm"] += h
        first["head"] = counts["head"]
    held = {k: n / tp for k, n in first.items()}
    trained = {k: n for k, n in held.items() if not (k == "vision" and not work.vision_trained)
               and not (k == "merger" and not work.merger_trained)}
    weights = 2 * sum(held.values())
    n_trained = sum(trained.values())
    if work.distributed_optimizer:
        grads = 4 * n_trained
        optim = 12 * n_trained / dp
        step_transient = 4 * n_trained / dp
    else:
        grads = 2 * n_trained
        optim = 12 * n_trained
        step_transient = 0  # MasterAdamW's fused kernel: no fp32 gradient copies, no per-element temporaries

    if work.recompute == "full":
        per_token = h / (tp if work.sequence_parallel else 1)
    else:
        sharded = (h + 2 * kv * hd) + h + 3 * inter
        replicated = 4 * h
        per_token = sharded / tp + replicated / (tp if work.sequence_parallel else 1)
    in_flight = min(pp, work.microbatches)
    llm_act = 2 * per_token * work.micro_batch_tokens * stage_layers * in_flight
    c, vi = v["hidden_size"], v["intermediate_size"]
    vision_transient = 2 * work.micro_batch_patches * (4 * c + 3 * vi / tp)
    merger_saved = 2 * work.micro_batch_patches * c * in_flight
    acts = llm_act + vision_transient + merger_saved
    total = weights + grads + optim + max(acts, step_transient) + overhead_gib * GIB

    seqs = [work.micro_batch_tokens]  # one long segment per microbatch bounds the attention cost from above
    side = int((work.micro_batch_patches) ** 0.5) // 2 * 2
    flops = training_step_flops(cfg, seqs, [[1, side, side]], vision_trained=work.vision_trained,
                                merger_trained=work.merger_trained).total * work.microbatches * dp
    gpus = tp * pp * dp
    compute_s = flops / (gpus * peak_flops * efficiency)
    bubble = (pp - 1) / (work.microbatches + pp - 1)
    tp_penalty = 1.0 + 0.04 * (tp - 1)  # exposed TP collectives grow with the group inside a node
    step = compute_s * tp_penalty / (1.0 - bubble)
    return Estimate(
        tp=tp, pp=pp, dp=dp, weights_gib=weights / GIB, grads_gib=grads / GIB, optimizer_gib=optim / GIB,
        activations_gib=acts / GIB, optimizer_step_gib=step_transient / GIB, total_gib=total / GIB, step_time_s=step,
        tokens_per_s=work.micro_batch_tokens * work.microbatches * dp / step, fits=total / GIB <= gpu_mem_gib,
    )


def candidates(cfg: Mapping, gpus: int, max_tp: int = 8) -> list[tuple[int, int, int]]:
    """(tp, pp, dp) with tp dividing every head count, tp <= 8 (one node), pp | layers and tp*pp*dp == gpus."""
    t = _text(cfg)
    out = []
    vision_heads = cfg["vision_config"]["num_heads"]
    for tp in (1, 2, 4, 8):
        # megatron splits attention heads and query groups evenly over TP ranks
        if tp > max_tp or t["num_attention_heads"] % tp or t.get("num_key_value_heads", 1) % tp or vision_heads % tp:
            continue
        for pp in range(1, t["num_hidden_layers"] + 1):
            if t["num_hidden_layers"] % pp or gpus % (tp * pp):
                continue
            out.append((tp, pp, gpus // (tp * pp)))
    return out


def plan(cfg: Mapping, work: Workload, gpus: int, gpu_mem_gib: float) -> tuple[list[Estimate], Estimate | None]:
    """All candidate estimates, and the recommendation: the highest tokens/s among layouts that fit with 10% headroom
    for allocator fragmentation (or, if none has that headroom, among those that fit at all); ties -> less memory."""
    ests = [estimate(cfg, work, tp=tp, pp=pp, dp=dp, gpu_mem_gib=gpu_mem_gib) for tp, pp, dp in candidates(cfg, gpus)]
    roomy = [e for e in ests if e.total_gib <= 0.9 * gpu_mem_gib]
    pool = roomy or [e for e in ests if e.fits]
    best = min(pool, key=lambda e: (-e.tokens_per_s, e.total_gib)) if pool else None
    return ests, best


def _hf_config_of_run_config(path: Path) -> Path:
    """The HF ``config.json`` a runtime YAML config trains: ``model.path``'s, or the built-in tiny model's."""
    from vlr_runtime.config import ConfigError, parse_args

    try:
        run_cfg = parse_args(["--config", str(path)])
    except ConfigError as exc:
        raise OSError(str(exc)) from exc
    if run_cfg.model.path:
        return Path(run_cfg.model.path) / "config.json"
    from vlr_runtime.data.synthetic import SyntheticSpec, ensure_synthetic

    spec = SyntheticSpec(train_pairs=run_cfg.data.synthetic_train_pairs, eval_pairs=run_cfg.data.synthetic_eval_pairs)
    return ensure_synthetic(run_cfg.data.cache_dir or None, spec).model_dir / "config.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlr_runtime.plan", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="runtime YAML config; its model.path/config.json is read")
    src.add_argument("--hf-config", type=Path, help="an HF Qwen2.5-VL config.json directly")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--micro-batch-tokens", type=int, default=4096)
    p.add_argument("--micro-batch-patches", type=int, default=4096)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    p.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction, default=True,
                   help="the run's parallel.distributed_optimizer (off: the trainer's replicated MasterAdamW)")
    p.add_argument("--json", action="store_true", help="print every estimate as JSON")
    args = p.parse_args(argv)
    try:
        hf_path = _hf_config_of_run_config(args.config) if args.config is not None else args.hf_config
        cfg = json.loads(Path(hf_path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"plan: cannot read the model config of {args.config or args.hf_config}: {exc}", file=sys.stderr)
        return 1
    work = Workload(micro_batch_tokens=args.micro_batch_tokens, micro_batch_patches=args.micro_batch_patches,
                    microbatches=args.microbatches, recompute=args.recompute,
                    distributed_optimizer=args.distributed_optimizer)
    ests, best = plan(cfg, work, args.gpus, args.gpu_mem)
    if args.json:
        for e in ests:
            print(json.dumps(asdict(e)))
    else:
        print(f"{'tp':>3} {'pp':>3} {'dp':>4} {'weights':>8} {'grads':>7} {'optim':>7} {'acts':>7} {'step':>7}"
              f" {'total':>7} {'step_s':>8} {'tok/s':>9} fits")
        for e in ests:
            print(f"{e.tp:>3} {e.pp:>3} {e.dp:>4} {e.weights_gib:>8.1f} {e.grads_gib:>7.1f} {e.optimizer_gib:>7.1f}"
                  f" {e.activations_gib:>7.1f} {e.optimizer_step_gib:>7.1f} {e.total_gib:>7.1f}"
                  f" {e.step_time_s:>8.3f} {e.tokens_per_s:>9.0f} {'yes' if e.fits else 'no'}")
    if best is None:
        print(f"plan: no layout fits in {args.gpu_mem} GiB per GPU; try --recompute full or more GPUs")
        return 2
    print(f"recommended: tp={best.tp} pp={best.pp} dp={best.dp} ({best.total_gib:.1f} GiB/GPU, "
          f"~{best.tokens_per_s:,.0f} tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
