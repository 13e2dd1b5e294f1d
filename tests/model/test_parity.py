"""Parity with stock transformers on tiny random Qwen2.5-VL checkpoints (TP=1, one process)."""

import copy

import pytest
import torch

from tests.model.hf_reference import hf_scores, pack
from vlr_runtime.checkpoint.hf import load_hf_checkpoint
from vlr_runtime.data.types import PackedBatch
from vlr_runtime.model import ModelArgs, build_reward_model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()).abs() / b.double().abs().clamp_min(1e-3)).max())


@pytest.fixture(scope="module")
def loaded(tp1, tiny_ckpt):
    d = tiny_ckpt[0]
    model = build_reward_model(ModelArgs.from_hf_config(d), dtype=torch.float32, device=tp1.device, seed=None)
    info = load_hf_checkpoint(model, d)
    return model, info


def test_load_reports_head_and_ignored(loaded):
    _, info = loaded
    assert info["head"] == "value_head"
    assert info["ignored"] == ["lm_head.weight"]


@pytest.mark.parametrize("which", [[0], [1], [2], [0, 1, 2, 3]], ids=["one_image", "two_images", "no_image", "packed"])
def test_scores_match_transformers_fp32(loaded, tiny_ckpt, inputs, which):
    model, _ = loaded
    _, hf, w, b = tiny_ckpt
    samples, pixels, grids = inputs
    chosen = [samples[i] for i in which]
    ref = hf_scores(hf, chosen, pixels, grids, w, b)
    ours = model.rewards(pack(hf, chosen, pixels, grids))
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert rel_err(ours, ref) <= 1e-4, (ours, ref)


def test_packed_batch_encodes_each_image_once(loaded, tiny_ckpt, inputs, monkeypatch):
    model, _ = loaded
    samples, pixels, grids = inputs
    batch = pack(tiny_ckpt[1], samples, pixels, grids)
    seen = []
    original = model.vision.forward
    monkeypatch.setattr(model.vision, "forward", lambda pv, g: (seen.append(g.tolist()), original(pv, g))[1])
    model.rewards(batch)
    assert seen == [[list(grids[0]), list(grids[1])]]  # 4 placeholder groups, 2 unique images, one ViT call


def test_loss_matches_bradley_terry_on_reference_and_backprops(loaded, tiny_ckpt, inputs):
    model, _ = loaded
    _, hf, w, b = tiny_ckpt
    samples, pixels, grids = inputs
    batch = pack(hf, samples, pixels, grids)  # pairs (0, 1), (2, 3)
    ref = hf_scores(hf, samples, pixels, grids, w, b)
    # The centering term gives the head bias a gradient (it cancels in r_chosen - r_rejected).
    ref_loss = -torch.nn.functional.logsigmoid(ref[0::2] - ref[1::2]).mean() + 0.1 * (ref**2).mean()
    model.zero_grad(set_to_none=True)
    loss, rewards, acc = model.loss(batch, center_coef=0.1)
    assert rel_err(rewards.detach(), ref) <= 1e-4
    assert abs(loss.item() - float(ref_loss)) <= 1e-4 * max(1.0, abs(float(ref_loss)))
    assert float(acc) == float((ref[0::2] > ref[1::2]).double().mean())
    loss.backward()
    groups = model.param_groups()
    assert set(groups) == {"vision", "merger", "llm", "head"}
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or float(p.grad.abs().sum()) == 0.0]
    assert not missing, missing
    model.zero_grad(set_to_none=True)


def test_bfloat16_within_bf16_tolerance(tp1, tiny_ckpt, inputs):
    d, hf, w, b = tiny_ckpt
    samples, pixels, grids = inputs
    ref = hf_scores(hf, samples, pixels, grids, w, b)
    model = build_reward_model(ModelArgs.from_hf_config(d), dtype=torch.bfloat16, device=tp1.device, seed=None)
    load_hf_checkpoint(model, d)
    assert model.language.embed.weight.dtype == torch.bfloat16
    ours = model.rewards(pack(hf, samples, pixels, grids))
    hf_bf16 = hf_scores(copy.deepcopy(hf).to(torch.bfloat16), samples, [p.bfloat16() for p in pixels], grids,
                        w.bfloat16(), b.bfloat16())  # a copy: casting the shared fixture back would lose precision
    err_ours = float((ours.double() - ref).abs().max())
    err_hf = float((hf_bf16 - ref).abs().max())
    # flash-attention's rule: at most 2x the error of the stock implementation at the same precision (+ a floor).
    assert err_ours <= 2 * err_hf + 2e-2 * float(ref.abs().max()), (err_ours, err_hf)


def test_mismatched_image_tokens_raise(loaded, tiny_ckpt, inputs):
    model, _ = loaded
    samples, pixels, grids = inputs
    batch = pack(tiny_ckpt[1], samples[:1], pixels, grids)
    batch.input_ids = batch.input_ids.clone()
    batch.input_ids[0] = model.args.image_token_id
    with pytest.raises(ValueError, match="image_pad"):
        model(batch)


def test_shared_prompt_pair_scores_like_two_sequences(loaded, tiny_ckpt, inputs):
    """[prompt | chosen | rejected] as ONE segment (rejected attends to the prompt and itself, positions restart
    after the prompt) scores exactly as the two separate sequences do in transformers."""
    from tests.model.hf_reference import Sample, hf_positions

    model, _ = loaded
    _, hf, w, b = tiny_ckpt
    _, pixels, grids = inputs
    gen = torch.Generator().manual_seed(5)
    prompt = torch.cat([torch.randint(0, 110, (4,), generator=gen), torch.tensor([122]),
                        torch.full((15,), model.args.image_token_id), torch.tensor([123]),
                        torch.randint(0, 110, (3,), generator=gen)])
    chosen, rejected = torch.randint(0, 110, (6,), generator=gen), torch.randint(0, 110, (9,), generator=gen)
    pair = [Sample(torch.cat([prompt, chosen]), [0]), Sample(torch.cat([prompt, rejected]), [0])]
    ref = hf_scores(hf, pair, pixels, grids, w, b)
    p, s = prompt.numel(), prompt.numel() + chosen.numel()
    total = s + rejected.numel()
    pos_c, pos_r = hf_positions(hf, pair[0], grids), hf_positions(hf, pair[1], grids)
    batch = PackedBatch(
        input_ids=torch.cat([prompt, chosen, rejected]),
        position_ids=torch.cat([pos_c, pos_r[:, p:]], dim=1).contiguous(),
        cu_seqlens=torch.tensor([0, total], dtype=torch.int32), max_seqlen=total,
        scored_index=torch.tensor([s - 1, total - 1]), pair_index=torch.tensor([[0, 1]]),
        pixel_values=pixels[0], image_grid_thw=torch.tensor([grids[0]]), image_index=torch.tensor([0]),
        prefix_lens=torch.tensor([p], dtype=torch.int32), split_lens=torch.tensor([s], dtype=torch.int32),
    )
    assert rel_err(model.rewards(batch), ref) <= 1e-4


def test_recompute_gives_identical_loss_and_grads(loaded, tiny_ckpt, inputs):
    model, _ = loaded
    samples, pixels, grids = inputs
    batch = pack(tiny_ckpt[1], samples, pixels, grids)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss, _, _ = model.loss(batch, center_coef=0.1)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    # Pre-hooks: checkpoint's recompute stops early, once the saved tensors are rebuilt, before a forward hook.
    hooks = [m.register_forward_pre_hook(lambda mod, args: calls.append(mod))
             for m in (model.language.layers["0"], model.vision.blocks[0])]
    try:
        plain_loss, plain = loss_and_grads()
        assert len(calls) == 2
        model.set_recompute(llm=True, vision=True)
        re_loss, re = loss_and_grads()
        assert len(calls) == 2 + 4  # each checkpointed layer runs again in backward
    finally:
        model.set_recompute(llm=False, vision=False)
        model.zero_grad(set_to_none=True)
        for h in hooks:
            h.remove()
    assert torch.equal(plain_loss, re_loss)
    for name, g in plain.items():
        assert torch.allclose(re[name], g, rtol=1e-5, atol=1e-7), name
