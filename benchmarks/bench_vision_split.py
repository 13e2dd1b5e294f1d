"""The saving of splitting a replicated, frozen ViT's images across the ranks of a TP group (issue 7 item 1).

When the vision widths do not divide by TP (16 heads / 3420-wide MLP at TP=8) the tower runs replicated on every TP
rank. With the patch embedding and blocks frozen, ``VisionTower`` then has each rank encode only its share of the
images (``image_owners``: contiguous runs balanced by patch count), all-gathers the block outputs and runs the
merger on all of them (``VisionTower._encode_split``). Measured here, per rank, on the same module, weights and
images:
  split        the product path: ``image_split_group`` = the TP group
  replicated   every rank encodes every image (``image_split_group = None``), what the tower would cost without it
``replicated/split`` (slowest rank) is the saving; it is printed next to two analytic counts: total patches / the
largest rank's patches, and the same with FLOPs (``vlr_runtime.flops.vision_forward_flops``: full attention is
quadratic in an image's patches, and the merger runs on every image in both modes), and next to the encode time of
all images over that of the largest share, each timed with the other ranks idle (what the ratio would be without
ranks competing for the machine's shared cores, caches and memory bandwidth). Before timing, the two outputs must
agree (max |split - replicated| <= 1e-6 * max |replicated|, fp32).

Each rank is one process (gloo, torch threads = 1, eager kernels, attention by SDPA per segment), timed with a
wall clock, a barrier before every call, the two modes alternating. CPU only (one process per rank, no GPU needed):
the ratio is only meaningful with one otherwise idle core per process (a 2-core machine: 2 processes); the
absolute milliseconds are not GPU numbers.

    python benchmarks/bench_vision_split.py              # 2 processes, hidden 320, depth 8, 6 images of 96-864 patches
    python benchmarks/bench_vision_split.py --procs 4
    python benchmarks/bench_vision_split.py --quick      # tiny smoke run
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Recorder, base_parser

MAX_REL_DIFF = 1e-6
FULL_GRIDS = ((1, 28, 28), (1, 16, 24), (1, 20, 20), (1, 12, 16), (1, 24, 36), (1, 8, 12))
"""Six images of 784, 384, 400, 192, 864, 96 patches (2,720 in all): unequal sizes, so the split is not exact."""
QUICK_GRIDS = ((1, 8, 8), (1, 4, 8), (1, 8, 12), (1, 4, 4))


@dataclass
class Workload:
    """What every rank builds: the tower's sizes, the images, the timing repetitions."""

    vision: dict
    grids: list[list[int]]
    warmup: int
    rep: int
    timeout_s: int

    @property
    def args(self):
        """The tower's ``VisionArgs`` (imported here: the launcher process never loads megatron-core)."""
        from vlr_runtime.model.args import VisionArgs

        return VisionArgs(**self.vision)


def make_workload(quick: bool, rep: int) -> Workload:
    """Widths chosen so that ``vision_splits_over`` is False for TP 2 and 4 (odd MLP width, as 3420 at TP=8): the
    reward model takes the replicated tower with the image split for them."""
    if quick:
        vision = {"depth": 2, "hidden_size": 64, "intermediate_size": 85, "num_heads": 4, "out_hidden_size": 48,
                  "fullatt_block_indexes": [1]}
        return Workload(vision, [list(g) for g in QUICK_GRIDS], warmup=1, rep=3, timeout_s=60)
    vision = {"depth": 8, "hidden_size": 320, "intermediate_size": 855, "num_heads": 16, "out_hidden_size": 512,
              "fullatt_block_indexes": [3, 7]}
    return Workload(vision, [list(g) for g in FULL_GRIDS], warmup=2, rep=rep, timeout_s=600)


def _build_tower(work: Workload, ctx):
    """The replicated tower as ``RewardModel`` builds it for ``vision_parallel='images'``, seeded random weights
    (identical on every rank), patch embedding and blocks frozen, merger trainable."""
    from vlr_runtime.model.layers import RMSNorm, parallel_config
    from vlr_runtime.model.vision import VisionTower

    tower = VisionTower(work.args, parallel_config(1, torch.float32), ctx.self_group, image_split_group=ctx.tp_group)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(tower.named_parameters()):
            # norm weights near 1, everything else small: activations stay O(1) through the blocks
            base = 1.0 if isinstance(tower.get_submodule(name.rpartition(".")[0]), RMSNorm) else 0.0
            p.copy_(base + 0.05 * torch.randn(p.shape, generator=gen))
    tower.patch_embed.requires_grad_(False)
    tower.blocks.requires_grad_(False)
    return tower


def _quantiles(times_ms: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(times_ms, n=10, method="inclusive") if len(times_ms) > 1 else times_ms * 9
    return statistics.median(times_ms), q[1], q[7]


def _wall_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _own_share(pixels: torch.Tensor, grid: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's images under ``image_owners`` (contiguous in the batch): ``([n_r, patch_dim], [I_r, 3])``."""
    from vlr_runtime.model.vision import image_owners

    patches = grid.prod(-1)
    owners = image_owners(patches, world)
    ends = torch.cumsum(patches, 0)
    mine = (owners == rank).nonzero().squeeze(1)
    if not mine.numel():
        return pixels[:0], grid[:0]
    start, stop = int(ends[mine[0]] - patches[mine[0]]), int(ends[mine[-1]])
    return pixels[start:stop], grid[mine]


def _compare_modes(tower, pixels: torch.Tensor, grid: torch.Tensor, tp_group) -> tuple[float, float]:
    """``(max |split - replicated|, max |replicated|)`` of the tower's outputs; raises if the split path is not
    the one taken with ``image_split_group`` set."""
    split_calls = []
    product_encode_split = tower._encode_split

    def spy(*a):
        split_calls.append(1)
        return product_encode_split(*a)

    tower._encode_split = spy
    tower.image_split_group = tp_group
    out_split = tower(pixels, grid).detach()
    del tower._encode_split
    tower.image_split_group = None
    out_repl = tower(pixels, grid).detach()
    if not split_calls:
        raise RuntimeError("the split path was not taken: the encoder is trainable or the group has one rank")
    return float((out_split - out_repl).abs().max()), float(out_repl.abs().max())


def _time_modes(tower, pixels: torch.Tensor, grid: torch.Tensor, tp_group, work: Workload) -> dict[str, list[float]]:
    """Wall-clock ms of this rank per repetition: ``split`` and ``replicated`` tower forwards (all ranks at once,
    a barrier before each); ``share alone`` (its own images) and, on rank 0, ``all alone`` (every image): encode
    only, one rank at a time while the others wait at a barrier, i.e. without a busy neighbour on the machine (the
    ranks of this run share one; the GPUs of a TP group do not share their compute)."""
    import torch.distributed as dist

    rank, world = tp_group.rank(), tp_group.size()
    share_pixels, share_grid = _own_share(pixels, grid, rank, world)
    modes = {"split": tp_group, "replicated": None}
    times: dict[str, list[float]] = {m: [] for m in (*modes, "share alone", "all alone")}
    for i in range(work.warmup + work.rep):
        timed = {}
        for mode in list(modes) if i % 2 == 0 else list(reversed(modes)):  # neither mode always runs second
            tower.image_split_group = modes[mode]
            dist.barrier(group=tp_group)
            timed[mode] = _wall_ms(lambda: tower(pixels, grid))
        for r in range(world):
            dist.barrier(group=tp_group)
            if r != rank:
                continue
            with torch.no_grad():
                if share_grid.numel():
                    timed["share alone"] = _wall_ms(lambda: tower.encode(share_pixels, share_grid))
                if rank == 0:
                    timed["all alone"] = _wall_ms(lambda: tower.encode(pixels, grid))
        if i >= work.warmup:
            for mode, ms in timed.items():
                times[mode].append(ms)
    tower.image_split_group = tp_group
    return times


def _worker(rank: int, world: int, port: int, work: Workload, out_path: str) -> None:
    """One TP rank: check that both modes give the same output, then time them alternately."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from vlr_kernels import set_default_backend

    from vlr_runtime.model.vision import vision_splits_over
    from vlr_runtime.parallel import setup_distributed, teardown

    if vision_splits_over(work.args, world):
        raise ValueError(f"vision widths divide by tp={world}: the reward model would shard the tower instead")
    set_default_backend("torch")  # the Triton interpreter would time the interpreter, not the split
    # The eager attention pads every segment to the longest one (n_images * max_len**2 for the full-attention
    # blocks), which over-charges the replicated mode; SDPA per segment costs what a varlen GPU kernel does.
    os.environ["VLR_VARLEN_ATTENTION_BACKEND"] = "sdpa"
    ctx = setup_distributed(tp=world, device="cpu", timeout_s=work.timeout_s)
    try:
        tower = _build_tower(work, ctx)
        grid = torch.tensor(work.grids)
        pixels = torch.randn(int(grid.prod(-1).sum()), work.args.patch_dim, generator=torch.Generator().manual_seed(1))
        max_abs, ref_abs = _compare_modes(tower, pixels, grid, ctx.tp_group)
        times = _time_modes(tower, pixels, grid, ctx.tp_group, work)
        mine = {"rank": rank, "max_abs_diff": max_abs, "ref_max_abs": ref_abs,
                "ms": {m: _quantiles(t) for m, t in times.items() if t}}
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if rank == 0:
            Path(out_path).write_text(json.dumps({"ranks": gathered, "analytic": analytic_shares(work, world)}))
    finally:
        teardown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(work: Workload, procs: int) -> dict:
    """Spawn ``procs`` ranks, wait at most ``work.timeout_s`` (then kill them), return what rank 0 wrote:
    ``{"ranks": [per-rank results], "analytic": analytic_shares(...)}``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        spawned = mp.start_processes(_worker, args=(procs, _free_port(), work, str(out)), nprocs=procs, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + work.timeout_s
        # join raises with the worker's traceback when one fails (and terminates the others)
        while not spawned.join(timeout=0.2):
            if time.monotonic() > deadline:
                for p in spawned.processes:
                    p.kill()
                raise SystemExit(f"ranks did not finish within {work.timeout_s} s")
        return json.loads(out.read_text())


def analytic_shares(work: Workload, procs: int) -> tuple[list[int], list[int], float, float]:
    """``(patches per rank, images per rank, total/max patches, FLOPs ratio)``: the saving if time followed the
    patches, and if it followed the forward FLOPs (tower of the largest share + merger on everything, vs all)."""
    from vlr_runtime.flops import vision_forward_flops
    from vlr_runtime.model.vision import image_owners

    grid = torch.tensor(work.grids)
    patches = grid.prod(-1)
    owners = image_owners(patches, procs)
    per_rank = torch.zeros(procs, dtype=torch.int64).index_add_(0, owners, patches).tolist()
    images = torch.bincount(owners, minlength=procs).tolist()
    cfg = {"vision_config": work.vision}
    tower_all, merger = vision_forward_flops(cfg, work.grids)
    tower_max = max(vision_forward_flops(cfg, [g for g, o in zip(work.grids, owners.tolist()) if o == r])[0]
                    for r in range(procs))
    return per_rank, images, sum(per_rank) / max(per_rank), (tower_all + merger) / (tower_max + merger)


def main(argv: list[str] | None = None) -> str:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, default=2, help="TP ranks (processes), >= 2")
    p.set_defaults(dtype="float32", rep=15)
    args = p.parse_args(argv)
    if args.procs < 2:
        raise SystemExit("--procs must be >= 2: one rank has nothing to split")
    if args.dtype != "float32":
        raise SystemExit("bench_vision_split runs in float32 only (the equality check is an fp32 bound)")
    if args.rep < 1:
        raise SystemExit("--rep must be >= 1")
    work = make_workload(args.quick, args.rep)
    cores = len(os.sched_getaffinity(0))
    note = (f"CPU, {args.procs} processes on {cores} cores, 1 thread each: "
            + ("the ratio is meaningful only while the cores are otherwise idle" if args.procs <= cores else
               "OVERSUBSCRIBED: the replicated ranks time-share cores, which inflates the measured ratio; read "
               "the encode-alone ratio"))
    print(f"[vision_split] {note}", flush=True)

    table, ok = report(run_ranks(work, args.procs), work, args.procs, note, args.csv)
    print(table, flush=True)
    if not ok:
        raise SystemExit("split and replicated outputs disagree")
    return table


def _ms(t: list[float]) -> str:
    return f"{t[0]:.1f} [{t[1]:.1f}-{t[2]:.1f}]"


def report(result: dict, work: Workload, procs: int, note: str, csv_path: Path | None) -> tuple[str, bool]:
    """CSV rows (appended to ``csv_path`` by the Recorder as they are added) and the markdown table of
    :func:`run_ranks`' ``result``; also whether the outputs agreed."""
    ranks = result["ranks"]
    per_rank, images, patch_ratio, flop_ratio = result["analytic"]
    a = work.vision
    x = (f"tp{procs} ViT d{a['depth']} h{a['hidden_size']} mlp{a['intermediate_size']} {a['num_heads']}heads, "
         f"{len(work.grids)} img {sum(per_rank)} patches, fp32 cpu")
    rec = Recorder("vision_split", torch.device("cpu"), csv_path)
    worst_rel = max(r["max_abs_diff"] / max(r["ref_max_abs"], 1e-30) for r in ranks)
    rec.add("split_vs_replicated", "fwd", "max_rel_diff", x, worst_rel)
    for r in ranks:
        for mode, (p50, p20, p80) in r["ms"].items():
            rec.add(mode, f"fwd rank{r['rank']}" if mode in ("split", "replicated") else f"encode rank{r['rank']}",
                    "ms", x, p50, p20, p80)
        rec.add(f"rank{r['rank']}", "split", "patches", x, per_rank[r["rank"]])
    # A step waits for its slowest rank: the saving is the slowest rank's time without the split over with it.
    slowest = {m: max(r["ms"][m][0] for r in ranks) for m in ("split", "replicated")}
    measured = slowest["replicated"] / slowest["split"]
    all_alone = ranks[0]["ms"]["all alone"][0]
    alone = all_alone / max(r["ms"]["share alone"][0] for r in ranks if "share alone" in r["ms"])
    for provider, ratio in (("replicated/split", measured), ("encode alone all/largest share", alone),
                            ("analytic patches", patch_ratio), ("analytic FLOPs", flop_ratio)):
        rec.add(provider, "fwd", "ratio", x, ratio)

    ok = worst_rel <= MAX_REL_DIFF
    env = rec.env
    lines = [f"{env['gpu']} | torch {env['torch']} | {env['sha']} | {env['time']} | {x}", f"note: {note}", "",
             ("| rank | images | patches | split ms p50 [p20-p80] | replicated ms p50 [p20-p80] | replicated/split "
              "| own images encoded alone ms |"),
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in ranks:
        t = r["ms"]
        share = _ms(t["share alone"]) if "share alone" in t else "no images"
        lines.append(f"| {r['rank']} | {images[r['rank']]} | {per_rank[r['rank']]} | {_ms(t['split'])} | "
                     f"{_ms(t['replicated'])} | {t['replicated'][0] / t['split'][0]:.2f}x | {share} |")
    saving = (f"saving (slowest rank, replicated/split): measured {measured:.2f}x | analytic: patches "
              f"{sum(per_rank)}/{max(per_rank)} = {patch_ratio:.2f}x, forward FLOPs {flop_ratio:.2f}x | ideal {procs}x")
    encode = (f"encode alone (one rank at a time, no merger, no all-gather): all images {all_alone:.1f} ms / "
              f"largest share = {alone:.2f}x")
    check = (f"output check: max |split - replicated| / max |replicated| = {worst_rel:.2e} "
             f"({'ok' if ok else 'FAILED'}, bound {MAX_REL_DIFF:g})")
    lines += ["", saving, encode, check]
    return "\n".join(lines), ok

if __name__ == "__main__":
    main()
