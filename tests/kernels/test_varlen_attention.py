"""varlen_attention: the eager reference against an independent dense-mask float64 implementation and the SDPA
loop; the Triton kernels (interpreter on CPU, fp32/fp16, tiny shapes) vs the float64 reference for outputs,
logsumexp and dq/dk/dv; backend selection and input errors. bf16 on GPU: test_attention_gpu.py."""

from __future__ import annotations

import pytest
import torch
from vlr_kernels import BackendUnavailable, varlen_attention, varlen_attention_ref
from vlr_kernels.attention.varlen_tiles import head_dim_chunks, tile_schedule
from vlr_kernels.attention.varlen_triton import varlen_attention_bwd, varlen_attention_fwd

from tests.kernels.helpers import assert_close64, to64

# The Triton tests run on the GPU when there is one (fp32 there uses IEEE dots), else through the interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cu(lens: list[int]) -> torch.Tensor:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


def dense_reference(q, k, v, lens_q, lens_k, causal, scale, prefix=None, split=None):
    """Float64 attention over the whole packed axis, masked token by token from the rules as written."""
    tq, tk = q.shape[0], k.shape[0]
    allowed = torch.zeros(tq, tk, dtype=torch.bool)
    oq = ok = 0
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        for a in range(lq):
            for b in range(lk):
                if causal and b > a + (lk - lq):
                    continue
                if prefix is not None:
                    q_rejected = a >= split[i]
                    k_chosen = prefix[i] <= b < split[i]
                    if q_rejected and k_chosen:
                        continue
                allowed[oq + a, ok + b] = True
        oq, ok = oq + lq, ok + lk
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("thd,uhd->htu", q, kk) * scale
    s = s.masked_fill(~allowed.to(s.device), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("htu,uhd->thd", p, vv), lse


def make(lens_q, lens_k, hq, hkv, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), hq, d, generator=g).to(dtype)
    k = torch.randn(sum(lens_k), hkv, d, generator=g).to(dtype)
    v = torch.randn(sum(lens_k), hkv, d, generator=g).to(dtype)
    return q, k, v


# ---------------------------------------------------------------- reference


@pytest.mark.parametrize("lens", [[5, 0, 17, 1, 30], [8, 7, 8, 8, 1]], ids=["dense-path", "padded-path"])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_dense_and_sdpa(lens, causal):
    q, k, v = to64(*make(lens, lens, 4, 2, 8))
    for t in (q, k, v):
        t.requires_grad_(True)
    out, lse = varlen_attention_ref(
        q, k, v, cu(lens), cu(lens), max(lens), max(lens), causal, 0.3, return_lse=True
    )
    exp_out, exp_lse = dense_reference(q, k, v, lens, lens, causal, 0.3)
    torch.testing.assert_close(out, exp_out)
    torch.testing.assert_close(lse, exp_lse)
    sdpa = varlen_attention(q, k, v, cu(lens), cu(lens), max(lens), max(lens), causal, 0.3, backend="sdpa")
    torch.testing.assert_close(out, sdpa)
    dout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(exp_out, (q, k, v), dout)):
        torch.testing.assert_close(a, b)


def test_reference_cross_lengths_and_rows_without_keys():
    lens_q, lens_k = [3, 9, 4], [7, 4, 0]
    q, k, v = to64(*make(lens_q, lens_k, 2, 1, 8))
    for causal in (False, True):
        out, lse = varlen_attention_ref(q, k, v, cu(lens_q), cu(lens_k), 9, 7, causal, return_lse=True)
        exp_out, exp_lse = dense_reference(q, k, v, lens_q, lens_k, causal, 8**-0.5)
        torch.testing.assert_close(out, exp_out)
        torch.testing.assert_close(lse, exp_lse)
    assert torch.isinf(lse).sum() > 0 and (out[-4:] == 0).all()
    # the SDPA loop: q shorter than k (end-aligned causal mask), and its clear error when q is longer
    sdpa = varlen_attention(q[:3], k[:7], v[:7], cu([3]), cu([7]), 3, 7, True, backend="sdpa")
    torch.testing.assert_close(sdpa, dense_reference(q[:3], k[:7], v[:7], [3], [7], True, 8**-0.5)[0])
    with pytest.raises(ValueError, match="more queries"):
        varlen_attention(q, k, v, cu(lens_q), cu(lens_k), 9, 7, True, backend="sdpa")


def test_shared_prompt_rows_equal_separate_sequences():
    """Rows of [prompt | chosen | rejected]: chosen = [prompt | chosen], rejected = [prompt | rejected]."""
    p, c, r = 6, 5, 4
    q, k, v = to64(*make([p + c + r], [p + c + r], 2, 1, 8))
    meta = dict(
        prefix_lens=torch.tensor([p], dtype=torch.int32), split_lens=torch.tensor([p + c], dtype=torch.int32)
    )
    packed = varlen_attention_ref(q, k, v, cu([p + c + r]), cu([p + c + r]), 15, 15, True, **meta)
    keep = torch.cat([torch.arange(p), torch.arange(p + c, p + c + r)])
    rejected = varlen_attention_ref(q[keep], k[keep], v[keep], cu([p + r]), cu([p + r]), 10, 10, True)
    chosen = varlen_attention_ref(q[: p + c], k[: p + c], v[: p + c], cu([p + c]), cu([p + c]), 11, 11, True)
    torch.testing.assert_close(packed[: p + c], chosen)
    torch.testing.assert_close(packed[p + c :], rejected[p:])


# ---------------------------------------------------------------- triton kernels (interpreter on CPU)


def check_triton(
    lens_q,
    lens_k,
    hq,
    hkv,
    d,
    causal,
    dtype=torch.float32,
    shared=None,
    block_m=None,
    block_n=None,
    dense=False,
    max_slack=0,
    configs=None,
):
    """Triton fwd (out, lse) and bwd (dq, dk, dv) vs float64 (``dense``: the token-by-token mask reference);
    ``max_slack`` over-states max_seqlen; ``configs`` forces kernels' launch configurations."""
    q, k, v = (t.to(DEVICE) for t in make(lens_q, lens_k, hq, hkv, d, dtype))
    cq, ck = cu(lens_q).to(DEVICE), cu(lens_k).to(DEVICE)
    mq, mk = max(lens_q, default=0) + max_slack, max(lens_k, default=0) + max_slack
    scale = d**-0.5
    pre = spl = None
    if shared is not None:
        pre, spl = (torch.tensor(x, dtype=torch.int32, device=DEVICE) for x in shared)
    out, lse = varlen_attention_fwd(
        q, k, v, cq, ck, mq, mk, causal, scale, pre, spl, block_m=block_m, block_n=block_n, configs=configs
    )
    dout = torch.randn_like(out)
    dq, dk, dv = varlen_attention_bwd(
        dout, q, k, v, out, lse, cq, ck, mq, mk, causal, scale, pre, spl, block_m=block_m, block_n=block_n,
        configs=configs,
    )
    q64, k64, v64 = to64(q, k, v)
    for t in (q64, k64, v64):
        t.requires_grad_(True)
    if dense:
        ref, ref_lse = dense_reference(
            q64, k64, v64, lens_q, lens_k, causal, scale, *(shared or (None, None))
        )
    else:
        ref, ref_lse = varlen_attention_ref(
            q64, k64, v64, cq, ck, mq, mk, causal, scale, prefix_lens=pre, split_lens=spl, return_lse=True
        )
    grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    assert_close64(out, ref, dtype, "out")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows without keys must have lse -inf"
    finite = torch.isfinite(ref_lse)
    assert_close64(lse[finite], ref_lse[finite], dtype, "lse")
    for name, got, exp in zip(("dq", "dk", "dv"), (dq, dk, dv), grads):
        assert_close64(got, exp, dtype, name, scale=4.0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [80, 128, 64])
def test_triton_head_dims_gqa(d, causal):
    lens = [1, 7, 64, 0, 20]
    check_triton(lens, lens, 4, 2, d, causal, block_m=32, block_n=16)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_triton_windows_fused_dq(causal):
    """Every segment within one kv tile (default blocks, max_seqlen <= 64): dQ comes from the dK/dV pass."""
    lens = [1, 7, 64, 0, 20, 33]
    check_triton(lens, lens, 4, 2, 80, causal)
    check_triton([3, 9, 5], [7, 4, 0], 2, 2, 16, causal)
    if causal:
        check_triton([30, 12], [30, 12], 4, 2, 32, True, shared=([10, 0], [20, 12]), dense=True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_triton_long_segment_default_blocks(causal):
    lens = [300, 7]
    check_triton(lens, lens, 1, 1, 16, causal)


@pytest.mark.parametrize("d", [8, 40, 200])
def test_triton_odd_head_dims(d):
    assert sum(head_dim_chunks(d)) >= d
    lens = [9, 23]
    check_triton(lens, lens, 2, 1, d, True, block_m=16, block_n=16)


def test_head_dim_chunks_avoid_padding_80_to_128():
    assert head_dim_chunks(80) == (64, 16)
    assert head_dim_chunks(96) == (64, 32)
    assert head_dim_chunks(128) == (128, 0)
    with pytest.raises(ValueError, match="256"):
        head_dim_chunks(288)


def test_triton_many_tiny_segments_and_one_long():
    """The tile schedule must cover every tile whatever the mix; MQA (8 q heads on one kv head)."""
    lens = [1] * 12 + [2, 3, 70] + [0, 0]
    check_triton(lens, lens, 4, 1, 16, False, block_m=16, block_n=16)


def test_triton_cross_lengths_causal_rows_without_keys():
    # Lk - Lq = 14 puts the causal diagonal two columns before a 16-column block edge
    lens_q, lens_k = [3, 9, 40, 5, 20], [7, 4, 33, 0, 34]
    check_triton(lens_q, lens_k, 2, 2, 16, True, block_m=16, block_n=16)
    check_triton(lens_q, lens_k, 2, 2, 16, False, block_m=16, block_n=16)


def test_triton_max_seqlen_only_bounds_the_grid():
    """An over-stated max_seqlen adds programs past the last tile; they must find no segment and exit."""
    check_triton([5, 17, 1], [5, 17, 1], 2, 1, 16, True, block_m=16, block_n=16, max_slack=50)


def test_triton_empty_batches():
    check_triton([0, 0], [0, 0], 2, 1, 16, True)
    q, k, v = (t.to(DEVICE) for t in make([], [], 2, 1, 16))
    out, lse = varlen_attention_fwd(q, k, v, cu([]).to(DEVICE), cu([]).to(DEVICE), 0, 0, False, 0.25)
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0)


def test_triton_fp16():
    lens = [5, 33, 1]
    check_triton(lens, lens, 4, 2, 80, True, dtype=torch.float16, block_m=16, block_n=16)


@pytest.mark.parametrize(
    "lens,prefix,split",
    [
        # parts longer than a 16-row tile: rejected-only tiles skip chosen blocks; tiles straddling a boundary
        ([20 + 25 + 19, 5 + 3 + 2], [20, 5], [45, 8]),
        # a rejected-only tile's two masked kv ranges with whole chosen blocks between them ([32, 48) skipped):
        # the forward and dQ loops jump over them in one pipelined loop
        ([20 + 40 + 19, 7 + 30 + 20], [20, 7], [60, 37]),
        # degenerate: plain causal (p=0, s=L), empty chosen (p=s), empty rejected (s=L), empty prompt (p=0)
        ([12, 9, 11, 10], [0, 4, 3, 0], [12, 4, 11, 6]),
    ],
    ids=["multi-tile", "gap", "degenerate"],
)
def test_triton_shared_prompt_pairs_vs_dense_mask(lens, prefix, split):
    check_triton(lens, lens, 4, 2, 32, True, shared=(prefix, split), block_m=16, block_n=16, dense=True)


def dkdv_config(block_m, block_n, flat, split, warps=4):
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": 2, "FLAT": flat,
            "SPLIT": split}


@pytest.mark.parametrize("split", [False, True], ids=["flat", "flat-split"])
def test_triton_dkdv_variants(split):
    """The dK/dV kernel's (q head, q block) loop and its per-q-head programs with fp32 partials summed per kv
    head: several q blocks per kv tile with masked/unmasked ranges, GQA and MQA, end-aligned causal rows
    without keys, shared-prompt pairs, fp16, and the fused dQ of one-tile segments."""
    small = {"dkdv": dkdv_config(16, 16, True, split)}
    check_triton([1, 7, 64, 0, 20], [1, 7, 64, 0, 20], 4, 2, 80, True, configs=small)
    check_triton([3, 9, 40, 5], [7, 4, 33, 0], 3, 1, 64, True, configs=small)
    check_triton([20 + 25 + 19, 5 + 3 + 2], [64, 10], 4, 2, 32, True, dtype=torch.float16,
                 shared=([20, 5], [45, 8]), dense=True, configs=small)
    # windows: every segment within one 64-row kv tile, so the dK/dV pass also writes dQ
    windows = [1, 7, 64, 0, 20, 33]
    check_triton(windows, windows, 4, 2, 80, False, configs={"dkdv": dkdv_config(32, 64, True, split)})


WINDOW_IDS = ["4heads-2stages", "2heads-3stages", "4heads-2stages-recompute", "2heads-3stages-recompute"]
# (forward, dK/dV) candidate indices: the per-window ones, then the persistent ones
WINDOW_PAIRS = [(0, 0), (1, 1), (0, 2), (1, 3)]


@pytest.mark.parametrize("which", range(4), ids=WINDOW_IDS)
def test_triton_one_tile_window_kernels(which):
    """The one-tile kernels (a program per segment and 2 or 4 heads, pipelined head loop; in-kernel delta; dQ,
    dK, dV written directly), every per-window dK/dV candidate (the recomputing ones recompute the softmax
    and delta instead of reading O and LSE) with the forward of its shape: windows of 0..64 rows at hd 80 and
    88 (64 + 32 with 8 padding columns), causal and not, end-aligned causal rows without keys, fp16, GQA
    forward with the general backward."""
    from vlr_kernels.attention.varlen_windows import window_candidates

    fwd_i, bwd_i = WINDOW_PAIRS[which]
    fwd = window_candidates(80, 64, 64, 4, 1, "fwd")[fwd_i]
    bwd = window_candidates(80, 64, 64, 4, 1, "dkdv")[bwd_i]
    assert fwd["BLOCK"] == 64 and (fwd["HEADS"], fwd["STAGES"]) == (bwd["HEADS"], bwd["STAGES"])
    assert bwd["RECOMPUTE"] == (which >= 2) and not fwd["PERSIST"] and not bwd["PERSIST"]
    configs = {"fwd": fwd, "dkdv": bwd}
    windows = [1, 7, 64, 0, 20, 33]
    check_triton(windows, windows, 4, 4, 80, which % 2 == 1, configs=configs)
    check_triton([5, 64, 17], [5, 64, 17], 4, 4, 88, which % 2 == 0, configs=configs)
    if bwd["RECOMPUTE"]:  # the new path gets both masks at both head dims
        check_triton(windows, windows, 4, 4, 80, which % 2 == 0, configs=configs)
        check_triton([5, 64, 17], [5, 64, 17], 4, 4, 88, which % 2 == 1, configs=configs)
    small = {"fwd": {**fwd, "BLOCK": 16}, "dkdv": {**bwd, "BLOCK": 16}}
    check_triton([3, 9, 5], [7, 4, 0], 4, 4, 16, True, dtype=torch.float16, configs=small)
    if not bwd["RECOMPUTE"]:  # the forward of this shape once is enough
        check_triton([3, 9, 5], [7, 4, 0], 8, 2, 16, which != 1, configs={"fwd": small["fwd"]})


def test_triton_persistent_window_kernels():
    """The persistent window kernels (a few programs per SM - 3 "SMs" under the interpreter - each looping over
    a run of consecutive (window, head) items, segment bounds carried from item to item): 7 windows x 5 heads =
    35 items, so runs start and end inside windows and the last program gets fewer items (forward 3/SM: 9 runs
    of 4, 2/SM: 6 of 6, 1/SM: 3 of 12; backward 1/SM: 3 of 12, 2/SM: 6 of 6); every candidate, empty windows,
    causal and not, hd 80 and 88, fp16, GQA forward."""
    from vlr_kernels.attention.varlen_windows import window_candidates, window_grid

    fwds = [c for c in window_candidates(80, 64, 64, 5, 1, "fwd") if c["PERSIST"]]
    bwds = [c for c in window_candidates(80, 64, 64, 5, 1, "dkdv") if c["PERSIST"]]
    assert [(c["PROGS"], c["STAGES"]) for c in fwds] == [(3, 2), (2, 3), (1, 4)]
    assert [(c["PROGS"], c["STAGES"], c["num_warps"], c["RECOMPUTE"], c.get("KV_MAJOR", 0)) for c in bwds] == [
        (1, 3, 8, 1, 0), (1, 4, 8, 1, 0), (2, 2, 4, 1, 0), (1, 3, 16, 1, 0), (1, 2, 16, 1, 0), (1, 3, 8, 2, 0),
        (1, 4, 8, 2, 0), (1, 3, 8, 0, 1), (1, 4, 8, 0, 1), (1, 3, 8, 2, 1), (1, 4, 8, 2, 1)]
    grids = [window_grid(c, 7, 5, torch.device("cpu")) for c in (*fwds, *bwds)]
    assert [(g[0], g[1]["per"]) for g in grids] == [((9,), 4), ((6,), 6), ((3,), 12), ((3,), 12), ((3,), 12),
                                                    ((6,), 6)] + [((3,), 12)] * 8
    windows = [1, 7, 64, 0, 20, 33, 5]
    for i, bwd in enumerate(bwds):
        configs = {"fwd": fwds[i % len(fwds)], "dkdv": bwd}
        check_triton(windows, windows, 5, 5, 80, i % 2 == 0, configs=configs)
    check_triton(windows, windows, 5, 5, 88, True, configs={"fwd": fwds[1], "dkdv": bwds[1]})
    small = {"fwd": {**fwds[0], "BLOCK": 16}, "dkdv": {**bwds[0], "BLOCK": 16}}
    check_triton([3, 9, 5, 16], [7, 4, 0, 16], 5, 5, 16, True, dtype=torch.float16, configs=small)
    check_triton([3, 9, 5, 16], [7, 4, 0, 16], 6, 2, 16, False, configs={"fwd": small["fwd"]})


def test_window_grid_covers_every_item_once():
    """Persistent grids: every (window, head) item in exactly one program's run, no empty program; the
    per-window grid is one program per window and head group."""
    from vlr_kernels.attention.varlen_windows import window_grid

    for n_seg in (1, 2, 7, 545):
        for heads in (1, 5, 16):
            for progs in (1, 2, 3):
                (grid,), items = window_grid({"PERSIST": 1, "PROGS": progs}, n_seg, heads, torch.device("cpu"))
                per, n = items["per"], items["n_items"]
                assert n == n_seg * heads and (grid - 1) * per < n <= grid * per and grid <= max(3 * progs, 1)
    assert window_grid({"PERSIST": 0, "HEADS": 4}, 545, 16, torch.device("cpu"))[0] == (545, 4)


def test_window_recompute_reads_neither_out_nor_lse():
    """The recomputing dK/dV candidate's gradients do not depend on the saved O and LSE: NaN in both changes
    nothing (the O-reading candidate turns NaN), and they match float64; the LSE-reading one (RECOMPUTE=2)
    ignores O but not the LSE, and matches float64 too."""
    from vlr_kernels.attention.varlen_windows import window_candidates

    lens = [1, 16, 0, 9]
    q, k, v = (t.to(DEVICE) for t in make(lens, lens, 2, 2, 16))
    c = cu(lens).to(DEVICE)
    args = (c, c, 16, 16, False, 0.25)
    out, lse = varlen_attention_fwd(q, k, v, *args)
    dout = torch.randn_like(out)
    cands = window_candidates(16, 16, 16, 2, 1, "dkdv")
    last_recompute = [c for c in cands if c["RECOMPUTE"] == 1][-1]
    reading, recompute = ({"dkdv": {**cfg, "BLOCK": 16}} for cfg in (cands[0], last_recompute))
    assert not reading["dkdv"]["RECOMPUTE"] and recompute["dkdv"]["PERSIST"]
    nan_out, nan_lse = torch.full_like(out, float("nan")), torch.full_like(lse, float("nan"))
    got = varlen_attention_bwd(dout, q, k, v, nan_out, nan_lse, *args, configs=recompute)
    assert all(torch.isfinite(g).all() for g in got)
    stale = varlen_attention_bwd(dout, q, k, v, nan_out, nan_lse, *args, configs=reading)
    assert not torch.isfinite(stale[1]).all()
    q64, k64, v64 = (t.requires_grad_(True) for t in to64(q, k, v))
    ref = varlen_attention_ref(q64, k64, v64, c, c, 16, 16, False, 0.25)
    grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    for name, g, exp in zip(("dq", "dk", "dv"), got, grads):
        assert_close64(g, exp, torch.float32, name, scale=4.0)
    # RECOMPUTE=2 (q-major and KV_MAJOR) reads the LSE but not O: NaN in O changes nothing, NaN in the LSE does;
    # the KV_MAJOR O-reading one turns NaN with O; each matches float64
    for pick in (lambda c: c.get("RECOMPUTE") == 2 and not c.get("KV_MAJOR"),
                 lambda c: c.get("RECOMPUTE") == 2 and c.get("KV_MAJOR"),
                 lambda c: c.get("RECOMPUTE") == 0 and c.get("KV_MAJOR")):
        cfg = {"dkdv": {**next(c for c in cands if pick(c)), "BLOCK": 16}}
        label = f"{cfg['dkdv']}"
        good = varlen_attention_bwd(dout, q, k, v, out, lse, *args, configs=cfg)
        for name, g, exp in zip(("dq", "dk", "dv"), good, grads):
            assert_close64(g, exp, torch.float32, f"{name} {label}", scale=4.0)
        assert not torch.isfinite(varlen_attention_bwd(dout, q, k, v, out, nan_lse, *args, configs=cfg)[1]).all()
        no_out = varlen_attention_bwd(dout, q, k, v, nan_out, lse, *args, configs=cfg)[1]
        if cfg["dkdv"]["RECOMPUTE"] == 2:
            assert no_out.equal(good[1]), label
        else:
            assert not torch.isfinite(no_out).all(), label


def test_window_candidates_only_for_one_tile_segments():
    from vlr_kernels.attention.varlen_windows import window_candidates

    cands = window_candidates(80, 64, 64, 16, 1, "fwd")
    assert [(c["HEADS"], c["STAGES"], c["PERSIST"]) for c in cands] == [
        (4, 2, 0), (2, 3, 0), (1, 2, 1), (1, 3, 1), (1, 4, 1)]
    assert all("RECOMPUTE" not in c for c in cands)
    # the O-reading backward first, then the recomputing one; the persistent one last in each (the order the
    # tuner times them in; an untuned GPU launch takes window_default's pick, see the next test)
    dkdv = window_candidates(80, 64, 64, 16, 1, "dkdv")
    assert [(c["HEADS"], c["STAGES"], c["PERSIST"], c["RECOMPUTE"]) for c in dkdv] == [
        (4, 2, 0, 0), (2, 3, 0, 0), (4, 2, 0, 1), (2, 3, 0, 1), (1, 3, 1, 1), (1, 4, 1, 1), (1, 2, 1, 1),
        (1, 3, 1, 1), (1, 2, 1, 1), (1, 3, 1, 2), (1, 4, 1, 2), (1, 3, 1, 0), (1, 4, 1, 0), (1, 3, 1, 2),
        (1, 4, 1, 2)]
    assert [(c["num_warps"], c.get("PROGS"), c.get("KV_MAJOR", 0)) for c in dkdv[4:]] == [
        (8, 1, 0), (8, 1, 0), (4, 2, 0), (16, 1, 0), (16, 1, 0), (8, 1, 0), (8, 1, 0)] + [(8, 1, 1)] * 4
    assert window_candidates(80, 65, 64, 16, 1, "fwd") == []  # a segment needs two tiles
    assert window_candidates(128, 64, 64, 28, 7, "fwd") == []  # head_dim class not compile-checked
    assert window_candidates(80, 64, 64, 8, 2, "dkdv") == []  # GQA backward: the general kernels
    assert [(c["HEADS"], c["RECOMPUTE"]) for c in window_candidates(80, 30, 30, 6, 1, "dkdv")] == [
        (2, 0), (2, 1)] + [(1, 1)] * 5 + [(1, 2)] * 2 + [(1, 0)] * 2 + [(1, 2)] * 2


def test_untuned_gpu_launch_takes_the_measured_window_pick(monkeypatch):
    """On a GPU an untuned launch (VLR_TUNE=0, or one under CUDA-graph capture before any tuning) of a one-tile
    window workload in bf16/fp16 takes H200 run G's picks, not the general table's first tile; on the CPU (the
    interpreter) and in fp32 the table's order stays; a head count without the 4-head forward program takes the
    first window shape."""
    from vlr_kernels.attention import varlen_triton as vtr
    from vlr_kernels.attention.varlen_tiles import launch_candidates
    from vlr_kernels.attention.varlen_windows import window_candidates, window_default

    monkeypatch.setenv("VLR_TUNE", "0")
    timed = []

    def choose(kernel, device, heads, dtype=torch.bfloat16):
        wins = window_candidates(80, 64, 64, heads, 1, kernel)
        return vtr._choose(kernel, (False, False, 1, dtype), device, 80, 64, 64, None, None, timed.append,
                           False, None, wins)

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    fwd, dkdv = choose("fwd", gpu, 16), choose("dkdv", gpu, 16)
    assert fwd["WINDOW"] and (fwd["PERSIST"], fwd["HEADS"], fwd["STAGES"]) == (0, 4, 2)
    assert dkdv["WINDOW"] and (dkdv["PERSIST"], dkdv["PROGS"], dkdv["STAGES"], dkdv["num_warps"],
                               dkdv["RECOMPUTE"], dkdv.get("KV_MAJOR", 0)) == (1, 2, 2, 4, 1, 0)
    assert choose("dkdv", gpu, 16, torch.float16) == dkdv
    for kernel in ("fwd", "dkdv"):
        assert choose(kernel, cpu, 16) == launch_candidates(80, 64, 64, kernel)[0]
        assert not choose(kernel, cpu, 16).get("WINDOW")
        # fp32 on a GPU: the table's first tile (the one the model's fp32 GPU test ran)
        assert choose(kernel, gpu, 16, torch.float32) == launch_candidates(80, 64, 64, kernel)[0]
    assert choose("fwd", gpu, 6) == window_candidates(80, 64, 64, 6, 1, "fwd")[0]
    assert choose("fwd", gpu, 6)["HEADS"] == 2
    assert window_default("dkdv", []) is None
    assert not timed  # VLR_TUNE=0: nothing launched to time


def test_dkdv_candidates_cover_the_variants():
    """hd 128 (LLM) offers the flat and split dK/dV candidates after the measured default; the shared-prompt
    specialisation leaves out the tiles that spill there."""
    from vlr_kernels.attention.varlen_tiles import launch_candidates

    cands = launch_candidates(128, 4096, 4096, "dkdv", flat=True)
    assert cands[0] == dkdv_config(16, 64, False, False, warps=8)
    assert {(c["FLAT"], c["SPLIT"]) for c in cands} == {(False, False), (True, False), (True, True)}
    shared = launch_candidates(128, 4096, 4096, "dkdv", shared=True, flat=True)
    assert dkdv_config(64, 64, True, False, warps=8) in cands
    assert dkdv_config(64, 64, True, False, warps=8) not in shared and shared[0] == cands[0]


@pytest.mark.parametrize("flat", [False, True], ids=["nested", "flat"])
def test_triton_atomic_dq(flat):
    """dQ added by every kv tile's program to an fp32 buffer (no dQ pass): segments of several 16-row kv tiles
    (each q row gets parts from up to 5), masked and unmasked ranges, causal end-aligned rows without keys (dQ
    0), non-causal hd 80 (64 + 16) and 88 (8 padding columns), GQA with the nested and the flat head loop, a
    q-head split, shared-prompt pairs, fp16; and the vision full-attention candidates at their own tile sizes."""
    from vlr_kernels.attention.varlen_tiles import launch_candidates

    small = {"dkdv": {**dkdv_config(16, 16, flat, False), "ATOMIC_DQ": True}}
    check_triton([1, 7, 64, 0, 20], [1, 7, 64, 0, 20], 4, 2, 80, False, configs=small)
    check_triton([3, 9, 40, 5], [7, 4, 33, 0], 3, 1, 64, True, configs=small)
    check_triton([33, 17], [33, 17], 2, 2, 88, True, dtype=torch.float16, configs=small)
    split = {"dkdv": {**dkdv_config(16, 16, True, True), "ATOMIC_DQ": True}}
    check_triton([40, 9], [40, 9], 4, 2, 32, True, configs=split)
    # shared-prompt pairs (the LLM's atomic candidates take them): rejected rows skip the chosen kv tiles
    check_triton([20 + 25 + 19, 5 + 3 + 2], [64, 10], 4, 2, 32, True, shared=([20, 5], [45, 8]), dense=True,
                 configs=small)
    if not flat:
        atomic = [c for c in launch_candidates(80, 150, 150, "dkdv") if c.get("ATOMIC_DQ")]
        assert [(c["BLOCK_M"], c["BLOCK_N"], c["num_stages"]) for c in atomic] == [
            (64, 64, 2), (64, 128, 2), (64, 64, 3), (64, 128, 3)]
        for cfg in atomic:  # 150 rows: 3 kv tiles of 64, 2 of 128
            check_triton([150, 70], [150, 70], 2, 2, 80, False, configs={"dkdv": cfg})
    assert not [c for c in launch_candidates(80, 150, 150, "dkdv", shared=True) if c.get("ATOMIC_DQ")]


def test_flat_candidates_switch(monkeypatch):
    """The flat dK/dV candidates reach the tuner unless VLR_ATTN_FLAT=0 (or flat=False): the switch for a GPU
    where they fail (an illegal address ends the CUDA context; no tuner survives that)."""
    from vlr_kernels.attention.varlen_tiles import launch_candidates

    monkeypatch.delenv("VLR_ATTN_FLAT", raising=False)
    default = launch_candidates(128, 4096, 4096, "dkdv")
    assert sum(c["FLAT"] for c in default) >= 4
    assert default == launch_candidates(128, 4096, 4096, "dkdv", flat=True)
    monkeypatch.setenv("VLR_ATTN_FLAT", "0")
    off = launch_candidates(128, 4096, 4096, "dkdv")
    assert off and not any(c["FLAT"] for c in off) and off[0] == default[0]
    assert off == launch_candidates(128, 4096, 4096, "dkdv", flat=False)


def test_new_candidates_switch(monkeypatch):
    """The candidates never run on a GPU yet (Tile.new; the window backward configurations of ``_NEW_WINDOWS``)
    reach the tuner unless VLR_ATTN_NEW=0 (or new=False), which leaves every other candidate, defaults first, in
    place. The candidates that runs E and G ran are marked new again here, to test the switch on the real tables'
    shapes."""
    from vlr_kernels.attention.varlen_tiles import launch_candidates
    from vlr_kernels.attention.varlen_windows import window_candidates, window_key

    from tests.kernels.helpers import RUN_G_WINDOWS, pretend_new_tiles

    monkeypatch.delenv("VLR_ATTN_NEW", raising=False)
    shapes = [(80, 8100, 8100, "dkdv"), (80, 8100, 8100, "dq"), (128, 4096, 4096, "dq")]
    plain = [launch_candidates(*a) for a in shapes]
    pretend_new_tiles(monkeypatch)
    on = [launch_candidates(*a) for a in shapes]
    assert on == plain  # marking a tile new changes nothing while VLR_ATTN_NEW is unset
    wins = [window_candidates(80, 64, 64, 16, 1, k) for k in ("fwd", "dkdv")]
    monkeypatch.setenv("VLR_ATTN_NEW", "0")
    off = [launch_candidates(*a) for a in shapes]
    wins_off = [window_candidates(80, 64, 64, 16, 1, k) for k in ("fwd", "dkdv")]
    for a, b in zip(on + wins[1:], off + wins_off[1:]):
        assert b and len(b) < len(a) and b == [c for c in a if c in b] and a[0] == b[0]
    assert wins_off[0] == wins[0]  # no forward window shape is new
    assert any(c.get("ATOMIC_DQ") for c in on[0]) and not any(c.get("ATOMIC_DQ") for c in off[0])
    assert not any(c["num_stages"] == 3 for c in off[0] + off[1])
    new_shapes = {window_key(c) for c in wins[1] if c not in wins_off[1]}
    assert new_shapes == RUN_G_WINDOWS
    assert any(c["PERSIST"] for c in wins_off[1])  # run E ran the 8-warp persistent backward
    assert off == [launch_candidates(*a, new=False) for a in shapes]
    monkeypatch.delenv("VLR_ATTN_NEW")
    assert off[0] == launch_candidates(80, 8100, 8100, "dkdv", new=False)


def test_candidate_lists_are_cached_copies(monkeypatch):
    """The candidate lists are built once per arguments and environment (they are looked up on every launch),
    and every call gets its own copy: a caller that edits its list or a configuration changes no later call."""
    from vlr_kernels.attention import varlen_tiles
    from vlr_kernels.attention.varlen_tiles import launch_candidates
    from vlr_kernels.attention.varlen_windows import window_candidates

    monkeypatch.delenv("VLR_ATTN_FLAT", raising=False)
    for get in (lambda: launch_candidates(128, 4096, 4096, "dkdv"),
                lambda: window_candidates(80, 64, 64, 16, 1, "dkdv")):
        first = get()
        expected = [dict(c) for c in first]
        first[0]["num_warps"] = 999
        first.append({"BLOCK_M": 1})
        assert get() == expected
    calls = []
    real = varlen_tiles._launch_candidates
    monkeypatch.setattr(varlen_tiles, "_launch_candidates", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(varlen_tiles, "_CANDIDATES", {})
    args = (128, 3000, 3000, "dq")
    assert launch_candidates(*args) == launch_candidates(*args) and len(calls) == 1
    monkeypatch.setenv("VLR_ATTN_FLAT", "0")  # another environment: built again, with the switch applied
    off = launch_candidates(128, 3000, 3000, "dkdv")
    assert not any(c["FLAT"] for c in off) and len(calls) == 2


def test_new_candidates_by_name(monkeypatch):
    """VLR_ATTN_NEW as a list of candidate names (what gpu_check.sh sets from its probe): exactly the listed new
    candidates join the old ones, per kernel and head dim (the same tile at another head dim is another kernel)."""
    from vlr_kernels.attention.varlen_tiles import candidate_id, launch_candidates
    from vlr_kernels.attention.varlen_windows import window_candidates

    from tests.kernels.helpers import pretend_new_tiles

    monkeypatch.delenv("VLR_ATTN_NEW", raising=False)
    pretend_new_tiles(monkeypatch)
    cases = [((80, 8100, 8100, "dq"), 80, "dq"), ((128, 4096, 4096, "dq"), 128, "dq"),
             ((80, 8100, 8100, "dkdv"), 80, "dkdv")]
    new_by_case = [[c for c in launch_candidates(*a) if c not in launch_candidates(*a, new=False)]
                   for a, _, _ in cases]
    win_new = [c for c in window_candidates(80, 64, 64, 16, 1, "dkdv")
               if c not in window_candidates(80, 64, 64, 16, 1, "dkdv", new=False)]
    assert all(new_by_case) and len(win_new) == 9
    dq80, dq128 = new_by_case[0][-1], new_by_case[1][-1]
    assert candidate_id("dq", 80, dq80) == "dq@80:" + "-".join(str(int(v)) for v in dq80.values())
    chosen = [candidate_id("dq", 80, dq80), candidate_id("dkdv", 80, win_new[1])]
    monkeypatch.setenv("VLR_ATTN_NEW", " , ".join(chosen))
    for (args, d, kernel), new in zip(cases, new_by_case):
        got = launch_candidates(*args)
        old = launch_candidates(*args, new=False)
        assert got == [c for c in launch_candidates(*args, new=True) if c in old or candidate_id(kernel, d, c) in chosen]
    assert [c for c in launch_candidates(80, 8100, 8100, "dq") if c not in launch_candidates(
        80, 8100, 8100, "dq", new=False)] == [dq80]
    # the hd-128 table has a new dQ tile with the same values as the listed hd-80 one: not listed, so left out
    assert dq128.items() == dq80.items()
    assert launch_candidates(128, 4096, 4096, "dq") == launch_candidates(128, 4096, 4096, "dq", new=False)
    wins = window_candidates(80, 64, 64, 16, 1, "dkdv")
    assert [c for c in wins if c not in window_candidates(80, 64, 64, 16, 1, "dkdv", new=False)] == [win_new[1]]


def test_public_triton_autograd_noncontiguous_inputs():
    """The public function: autograd through the Triton kernels, q/k/v strided views of one qkv tensor."""
    lens = [6, 13]
    qkv = torch.randn(sum(lens), 3, 2, 16, device=DEVICE, requires_grad=True)
    q, k, v = qkv.unbind(1)
    c = cu(lens).to(DEVICE)
    out = varlen_attention(q, k, v, c, c, 13, 13, causal=True, backend="triton")
    out.square().sum().backward()
    qkv64 = qkv.detach().double().requires_grad_(True)
    q64, k64, v64 = qkv64.unbind(1)
    ref = varlen_attention(q64, k64, v64, c, c, 13, 13, causal=True, backend="torch")
    ref.square().sum().backward()
    assert_close64(out, ref, torch.float32, "out")
    assert_close64(qkv.grad, qkv64.grad, torch.float32, "dqkv", scale=4.0)


# ---------------------------------------------------------------- backends and errors


def test_backend_errors_on_cpu_tensors(monkeypatch):
    q, k, v = make([4], [4], 2, 1, 16)
    args = (q, k, v, cu([4]), cu([4]), 4, 4)
    with pytest.raises(BackendUnavailable, match="CUDA"):
        varlen_attention(*args, backend="flash_attn")
    with pytest.raises(BackendUnavailable, match="not one of"):
        varlen_attention(*args, backend="cudnn")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        varlen_attention(*args, backend="triton")


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].long()), "int32"),
        (lambda a: a.update(k=a["k"][:, :, :8], v=a["v"][:, :, :8]), "head_dim"),
        (
            lambda a: a.update(q=torch.randn(10, 3, 16), k=torch.randn(10, 2, 16), v=torch.randn(10, 2, 16)),
            "multiple",
        ),
        (lambda a: a.update(cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32)), "token count"),
        (lambda a: a.update(max_seqlen_q=3), "max_seqlen"),
        (lambda a: a.update(prefix_lens=torch.tensor([1, 1], dtype=torch.int32)), "both"),
        (
            lambda a: a.update(
                prefix_lens=torch.tensor([1, 1], dtype=torch.int32),
                split_lens=torch.tensor([2, 2], dtype=torch.int32),
                causal=False,
            ),
            "causal=True",
        ),
        (
            lambda a: a.update(
                prefix_lens=torch.tensor([3, 1], dtype=torch.int32),
                split_lens=torch.tensor([2, 2], dtype=torch.int32),
            ),
            "prefix_lens <= split_lens",
        ),
    ],
)
def test_bad_inputs_raise(mutate, match):
    q, k, v = make([4, 6], [4, 6], 2, 1, 16)
    a = dict(
        q=q,
        k=k,
        v=v,
        cu_seqlens_q=cu([4, 6]),
        cu_seqlens_k=cu([4, 6]),
        max_seqlen_q=6,
        max_seqlen_k=6,
        causal=True,
    )
    mutate(a)
    with pytest.raises(ValueError, match=match):
        varlen_attention(**a, backend="torch")


def test_tile_schedule_names_each_tiles_segment():
    """Segments of 5, 0, 3, 0, 0 and 9 rows in blocks of 4: tiles 2 | 1 | 3, grid tiles past the last are N."""
    cu_seqlens = torch.tensor([0, 5, 5, 8, 8, 8, 17], dtype=torch.int32)
    cu_tiles, tile_seg = tile_schedule(cu_seqlens, 4, 9)
    assert cu_tiles.tolist() == [0, 2, 2, 3, 3, 3, 6]
    assert tile_seg.tolist() == [0, 0, 2, 5, 5, 5, 6, 6, 6] and tile_seg.dtype == torch.int32


def test_tuner_times_dkdv_candidates_with_the_dq_pick(monkeypatch):
    """The backward's tuner picks the dQ tile first and times every dK/dV candidate that needs a dQ pass together
    with that tile (not the default one, which would favour the candidates fusing dQ); the final launches use the
    picks and equal a launch with both forced. A fake tuner stands in for the timing: it launches what it is
    given and picks the last dQ candidate (not the default)."""
    import vlr_kernels.attention.varlen_triton as vt

    lens, hq, hkv, d = [40, 70], 2, 1, 16
    q, k, v = (t.to(DEVICE) for t in make(lens, lens, hq, hkv, d, torch.float32))
    cq = cu(lens).to(DEVICE)
    m, scale = max(lens), d**-0.5
    out, lse = varlen_attention_fwd(q, k, v, cq, cq, m, m, True, scale)
    dout = torch.randn_like(out)
    dq_cands = vt.launch_candidates(d, m, m, "dq", None, None, False)
    dkdv_cands = vt.launch_candidates(d, m, m, "dkdv", None, None, False)
    needs_pass = next(c for c in dkdv_cands if c["BLOCK_N"] < m and not c.get("ATOMIC_DQ"))
    events, dq_tiles = [], []
    real_dq = vt._varlen_attn_dq_kernel

    class SpyDq:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                dq_tiles.append((events[-1], kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_stages"]))
                return real_dq[grid](*args, **kwargs)
            return run

    picked = {}

    def fake_pick(key, cands, launch, device, reps=5):
        if key in picked:  # as the real tuner, once per key
            return picked[key]
        events.append(key[0])
        if key[0] == "dq":
            launch(cands[-1])
        if key[0] == "dkdv":
            launch(needs_pass)
        picked[key] = cands[-1] if key[0] == "dq" else cands[0]
        return picked[key]

    monkeypatch.setattr(vt, "_varlen_attn_dq_kernel", SpyDq())
    monkeypatch.setattr(vt, "pick", fake_pick)
    got = varlen_attention_bwd(dout, q, k, v, out, lse, cq, cq, m, m, True, scale)
    last = dq_cands[-1]
    tile = (last["BLOCK_M"], last["BLOCK_N"], last["num_stages"])
    assert events == ["dq", "dkdv"], events
    assert dkdv_cands[0]["BLOCK_N"] < m  # the final dK/dV launch needs a dQ pass too
    # the dQ pick's own timing launch, the dK/dV candidate's timing with it, and the final dQ pass with it
    assert dq_tiles == [("dq", *tile), ("dkdv", *tile), ("dkdv", *tile)], dq_tiles
    monkeypatch.undo()
    forced = varlen_attention_bwd(dout, q, k, v, out, lse, cq, cq, m, m, True, scale,
                                  configs={"dkdv": dkdv_cands[0], "dq": last})
    for a, b in zip(got, forced):
        assert torch.equal(a, b)
