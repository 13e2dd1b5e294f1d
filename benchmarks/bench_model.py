"""End-to-end reward model vs stock transformers, same weights, side by side (fwd / bwd / fwd+bwd, median ms, peak MiB).

Workloads (design.md peer table):
  model   Qwen2.5-VL at 7B widths with 4 decoder layers and the full 32-block ViT frozen (merger, LLM and head
          trained): 4 sequences x 1028 tokens, each with one 448x616 px image (grid 32x44 -> 352 image tokens),
          pairs (0, 1) and (2, 3), Bradley-Terry loss on the last token's post-norm hidden state x value head.
          hf_sdpa = Qwen2_5_VLForConditionalGeneration (sdpa) + value head on the last token; ours = RewardModel
          (packed tokens, vlr_kernels with automatic backends). Also reported: tokens/s of fwd+bwd.
  vision  the 7B vision tower alone (32 blocks, fwd without grad and fwd+bwd) on the 8 images of
          bench_attention.py (32,604 patches).
Both models get identical weights (ours is filled from the transformers state dict through the HF name mapping).

    python benchmarks/bench_model.py             # GPU, bf16
    python benchmarks/bench_model.py --quick     # tiny model on the CPU (smoke run)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Recorder, base_parser, bench_device, time_ms, want

SEQ_TOKENS, SEQS, IMAGE_GRID = 1028, 4, (1, 32, 44)
# The 8 images (h x w patches) of the attention workload, as bench_attention.py (not imported: it switches
# the Triton interpreter on at import).
VISION_GRIDS = [(64, 64), (48, 80), (100, 60), (32, 32), (74, 56), (20, 30), (90, 90), (40, 120)]
TEXT_7B = {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 4,
           "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
           "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}}
VISION_7B = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
             "fullatt_block_indexes": [7, 15, 23, 31]}
TEXT_TINY = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}}
VISION_TINY = {"depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "out_hidden_size": 64,
               "fullatt_block_indexes": [1]}


def build_models(quick: bool, dtype: torch.dtype, device: torch.device):
    """(hf model, our RewardModel, value head weight [H], bias [1]) with identical weights."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from vlr_runtime.checkpoint.hf import canonical_name
    from vlr_runtime.model import ModelArgs, build_reward_model
    from vlr_runtime.model.hf_names import HEAD_BIAS, HEAD_WEIGHT, fill_parameters

    text, vision = (TEXT_TINY, VISION_TINY) if quick else (TEXT_7B, VISION_7B)
    vocab = text["vocab_size"]
    config = Qwen2_5_VLConfig(text_config=dict(text), vision_config=dict(vision), image_token_id=vocab - 4,
                              video_token_id=vocab - 3, vision_start_token_id=vocab - 2, vision_end_token_id=vocab - 1)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: seconds instead of a minute of CPU init at 7B widths
        hf = Qwen2_5_VLForConditionalGeneration(config)
    # Module.to(dtype) also casts the rotary inv_freq buffers, which from_pretrained(dtype=bf16) keeps in fp32:
    # bf16-rounded frequencies (relative error up to 2^-9) put the LLM's fastest rotary angle ~2 rad off by
    # position 1,000, an error that stock transformers does not have. Keep them in fp32.
    keep = {n: b.detach().clone() for n, b in hf.named_buffers() if n.rsplit(".", 1)[-1].endswith("inv_freq")}
    hf = hf.to(dtype)
    for n, b in keep.items():
        owner, _, attr = n.rpartition(".")
        setattr(hf.get_submodule(owner), attr, b)
    h = text["hidden_size"]
    head_w = (torch.randn(h) / h**0.5).to(device, dtype)
    head_b = torch.zeros(1, device=device, dtype=dtype)
    state = {canonical_name(k): v for k, v in hf.state_dict().items()}
    state.update({HEAD_WEIGHT: head_w.view(1, h), HEAD_BIAS: head_b})

    def read(name: str, dim: int | None, start: int, length: int) -> torch.Tensor:
        t = state[name]
        return t if dim is None else t.narrow(dim, start, length)

    ours = build_reward_model(ModelArgs.from_hf_config(config.to_dict()), dtype=dtype, device=device, seed=None)
    fill_parameters(ours, read)
    return hf, ours, head_w, head_b


def freeze_vit(hf, ours) -> None:
    for p in [*hf.model.visual.patch_embed.parameters(), *hf.model.visual.blocks.parameters(),
              ours.vision.patch_embed, *ours.vision.blocks.parameters()]:
        p.requires_grad_(False)


def make_inputs(hf, quick: bool, device: torch.device, grid: tuple[int, int, int] | None = None):
    """Batched HF inputs and the same tokens packed into a PackedBatch: SEQS rows of SEQ_TOKENS tokens (64 with
    ``quick``), each with one image of ``grid`` (t, h, w) patches (default IMAGE_GRID; (1, 6, 8) with ``quick``)."""
    from vlr_runtime.data.types import PackedBatch

    grid = grid or ((1, 6, 8) if quick else IMAGE_GRID)
    seq = 64 if quick else SEQ_TOKENS
    cfg = hf.config
    n_img = grid[0] * grid[1] * grid[2] // 4
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.text_config.vocab_size - 8, (SEQS, seq), generator=g)
    ids[:, 5] = cfg.vision_start_token_id
    ids[:, 6: 6 + n_img] = cfg.image_token_id
    ids[:, 6 + n_img] = cfg.vision_end_token_id
    patches = grid[0] * grid[1] * grid[2]
    pixels = torch.randn(SEQS * patches, 3 * 2 * 14 * 14, generator=g)
    grids = torch.tensor([grid] * SEQS)
    mm = (ids == cfg.image_token_id).int()
    positions, _ = hf.model.get_rope_index(ids.to(device), mm_token_type_ids=mm.to(device), image_grid_thw=grids.to(device))
    hf_inputs = {"input_ids": ids.to(device), "mm_token_type_ids": mm.to(device),
                 "pixel_values": pixels.to(device, hf.dtype), "image_grid_thw": grids.to(device)}
    cu = torch.arange(SEQS + 1) * seq
    batch = PackedBatch(input_ids=ids.reshape(-1), position_ids=positions.reshape(3, -1).cpu(),
                        cu_seqlens=cu.to(torch.int32), max_seqlen=seq, scored_index=cu[1:] - 1,
                        pair_index=torch.arange(SEQS).view(-1, 2), pixel_values=pixels, image_grid_thw=grids,
                        image_index=torch.arange(SEQS))
    # the host-known image facts collate would add, so our model takes its synchronisation-free input path
    batch = batch.with_image_facts(image_token_id=cfg.image_token_id,
                                   spatial_merge_size=cfg.vision_config.spatial_merge_size).to(device)
    return hf_inputs, batch


def hf_rewards(hf, inputs, head_w, head_b):
    """``[rows]`` fp32 rewards of stock transformers + a linear head: post-norm hidden state of each row's last
    token."""
    hidden = hf.model(**inputs).last_hidden_state[:, -1]
    return (hidden @ head_w + head_b).float()


def pair_loss(rewards):
    """Bradley-Terry loss of rows paired as (0, 1), (2, 3), ..."""
    return -F.logsigmoid(rewards[0::2] - rewards[1::2]).mean()


def hf_loss(hf, inputs, head_w, head_b):
    return pair_loss(hf_rewards(hf, inputs, head_w, head_b))


def main(argv: list[str] | None = None) -> str:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--workloads", default="model,vision")
    args = p.parse_args(argv)
    device = bench_device()
    dtype = torch.float32 if args.quick and args.dtype == "bfloat16" else getattr(torch, args.dtype)
    warmup, rep = (1, 3) if args.quick else (5, args.rep)
    from vlr_runtime.parallel import setup_distributed, teardown

    setup_distributed(1)
    try:
        hf, ours, head_w, head_b = build_models(args.quick, dtype, device)
        freeze_vit(hf, ours)
        rec = Recorder("model", device, args.csv)
        if want("model", args.workloads):
            inputs, batch = make_inputs(hf, args.quick, device)
            x = f"{SEQS}x{batch.max_seqlen} tok, LLM {hf.config.text_config.num_hidden_layers} layers, ViT frozen"
            with torch.no_grad():  # same weights, same inputs: the two losses must agree before timing means much
                l_hf, l_ours = float(hf_loss(hf, inputs, head_w, head_b)), float(ours.loss(batch)[0])
            print(f"[model] loss hf_sdpa={l_hf:.5f} ours={l_ours:.5f}", flush=True)
            if abs(l_hf - l_ours) > 0.05 * max(1.0, abs(l_hf)):
                raise SystemExit(f"losses disagree: hf {l_hf} vs ours {l_ours}")
            providers = {"hf_sdpa": lambda: lambda: hf_loss(hf, inputs, head_w, head_b),
                         "ours": lambda: lambda: ours.loss(batch)[0]}
            params = [q for m in (hf, ours) for q in m.parameters() if q.requires_grad]
            rec.run_providers(providers, x, lambda loss: loss.backward(), params, None, None, args.providers,
                              warmup, rep)
            for r in [r for r in rec.rows if r.mode == "fwd+bwd" and r.metric == "ms"]:
                rec.add(r.provider, "fwd+bwd", "tok/s", x, batch.num_tokens / (r.p50 * 1e-3))
        if want("vision", args.workloads):
            grids = torch.tensor([(1, 6, 8)] * 2 if args.quick else [(1, h, w) for h, w in VISION_GRIDS], device=device)
            pixels = torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 14 * 14, device=device, dtype=dtype)
            x = f"{len(grids)} images, {pixels.shape[0]} patches"
            towers = {"hf_sdpa": lambda: hf.model.visual(pixels, grid_thw=grids).pooler_output,
                      "ours": lambda: ours.vision(pixels, grids)}
            for name, fn in towers.items():
                if not want(name, args.providers):
                    continue
                with torch.no_grad():
                    rec.add(name, "vision fwd (no grad)", "ms", x, *time_ms(fn, device, warmup, rep))
                for q in [*hf.model.visual.parameters(), *ours.vision.parameters()]:
                    q.requires_grad_(True)
                rec.add(name, "vision fwd+bwd", "ms", x, *time_ms(lambda f=fn: f().float().sum().backward(), device,
                                                                   warmup, rep))
        return rec.finish()
    finally:
        teardown()


if __name__ == "__main__":
    main()
