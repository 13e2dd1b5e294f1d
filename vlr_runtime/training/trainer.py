"""The training loop of a reward model: config in, metrics/checkpoints/export out.

Order of one optimizer step (every rank runs the same collectives in the same order): the loader's step (this DP
rank's share of ``train.pairs_per_step`` pairs, in token-budget micro-batches) -> :func:`forward_backward` over the
micro-batches (pp > 1: megatron's 1F1B schedule; each micro-batch's loss weighted by its share of the step's pairs)
-> every rank checks its loss and local gradients, all stop if any rank found NaN/Inf (before the optimizer touches
anything) -> gradients reduced over DP (flat all-reduce, or megatron DDP's reduce-scatter with
``parallel.distributed_optimizer``) -> global gradient norm (TP/PP shards counted once), clip, AdamW -> statistics
reduced over DP -> metrics line (JSONL, TensorBoard, optionally W&B).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import resource
import statistics
import time
from collections import deque
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import MegatronOptimizer
from safetensors.torch import load_file
from vlr_kernels import _tune

from vlr_runtime.checkpoint.hf import VALUE_HEAD_FILE, export_hf_checkpoint, load_hf_checkpoint
from vlr_runtime.checkpoint.manager import (
    COMPLETE,
    CheckpointManager,
    capture_rng_state,
    latest_complete,
    restore_rng_state,
    step_dir,
)
from vlr_runtime.config import Config, ConfigError, dump_config, to_dict
from vlr_runtime.data.collate import Preprocessor
from vlr_runtime.data.loader import LoaderConfig, PairLoader
from vlr_runtime.data.types import PackedBatch
from vlr_runtime.data.validate import format_report
from vlr_runtime.data.validate import validate as validate_data
from vlr_runtime.flops import batch_step_flops, mfu, peak_flops_for
from vlr_runtime.model import ModelArgs, RewardModel, build_reward_model
from vlr_runtime.parallel import ParallelContext, forward_backward, setup_distributed, wrap_ddp_and_optimizer
from vlr_runtime.training.data import CachedPreprocessor, load_eval_set, resolve_sources
from vlr_runtime.training.evaluate import evaluate
from vlr_runtime.training.metrics import MetricsLog
from vlr_runtime.training.optim import (
    MasterAdamW,
    average_dp_gradients,
    clip_factor,
    freeze_groups,
    global_grad_norm,
    lr_at,
)
from vlr_runtime.training.reshard import (
    canonical_tensors,
    distributed_shards,
    load_canonical,
    load_distributed_shards,
)

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm was NaN/Inf; raised on every rank before the optimizer step."""


def _shared_run_dir(requested: str, ctx: ParallelContext) -> Path:
    """``requested`` or ``runs/<timestamp>`` chosen on rank 0 (ranks could straddle a second boundary)."""
    name = [requested or str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))]
    if ctx.world_size > 1:
        dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def _fault_injection(name: str) -> tuple[int, int] | None:
    """Fault-injection hooks for tests, ``NAME=RANK:STEP``: ``VLR_INJECT_NAN`` makes global rank RANK's loss NaN at
    optimizer step STEP (a last-stage rank when pp > 1: only those compute the loss); ``VLR_INJECT_HANG`` makes that
    rank sleep for an hour at the start of that step (a hung rank)."""
    spec = os.environ.get(name, "")
    if not spec:
        return None
    try:
        rank, step = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ConfigError(f"{name}={spec!r}: expected RANK:STEP") from None
    return rank, step


@contextmanager
def _weighted_loss(chunks: list[RewardModel], weights: dict[int, float]):
    """Within the block, ``chunk.loss`` (which :func:`forward_backward` calls on the last stage) returns the loss
    of micro-batch ``b`` times ``weights[id(b)]``, so micro-batches holding different numbers of pairs weigh by
    their pairs although the schedule averages micro-batches with equal weights."""
    def weighted(inner):
        def loss(batch: PackedBatch, center_coef: float = 0.0, hidden_in: torch.Tensor | None = None):
            value, rewards, accuracy = inner(batch, center_coef, hidden_in)
            return value * weights[id(batch)], rewards, accuracy
        return loss

    for chunk in chunks:
        chunk.loss = weighted(chunk.loss)
    try:
        yield
    finally:
        for chunk in chunks:
            del chunk.loss


def _has_weights(model_dir: Path) -> bool:
    return any(p.name != VALUE_HEAD_FILE for p in model_dir.glob("*.safetensors"))


class Trainer:
    """Builds everything a run needs from ``cfg`` (process groups, data, model, optimizer, run directory).

    ``train()`` runs to ``total_steps``, evaluates, exports and returns the final evaluation metrics.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.ctx = ctx = setup_distributed(cfg.parallel.tp, cfg.parallel.pp, vpp=cfg.parallel.vpp,
                                           timeout_s=cfg.parallel.timeout_s)
        torch.manual_seed(cfg.train.seed)
        if cfg.model.kernel_backend != "auto":
            from vlr_kernels import set_default_backend

            set_default_backend(cfg.model.kernel_backend)
        self.run_dir = _shared_run_dir(cfg.run.dir, ctx)
        if ctx.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / "config.yaml")

        sources = resolve_sources(cfg.data, cfg.model, local_rank=ctx.local_rank)
        self.model_dir = sources.model_dir
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                      "auto": torch.bfloat16 if ctx.device.type == "cuda" else torch.float32}[cfg.model.dtype]
        self.args = ModelArgs.from_hf_config(self.model_dir)
        build = {"dtype": self.dtype, "device": ctx.device, "sequence_parallel": cfg.parallel.sequence_parallel}
        weights = _has_weights(self.model_dir)
        if not weights:
            log.info("%s holds no weights: random init with seed %d", self.model_dir, cfg.train.seed)
        # One model chunk per virtual pipeline stage of this rank (chunk v: global stage v * pp + pp_rank).
        self.chunks: list[RewardModel] = [
            build_reward_model(self.args, seed=None if weights else cfg.train.seed,
                               vp_stage=None if ctx.vpp == 1 else v, **build) for v in range(ctx.vpp)]
        for chunk in self.chunks:
            if weights:
                load_hf_checkpoint(chunk, self.model_dir, head_seed=cfg.train.seed)
            chunk.set_recompute(llm="llm" in cfg.model.recompute, vision="vision" in cfg.model.recompute)
        self.model: RewardModel | list[RewardModel] = self.chunks[0] if ctx.vpp == 1 else self.chunks
        """This rank's model as :func:`forward_backward` and the export take it: its stage, or with virtual
        pipeline stages the list of its chunks."""
        groups = [chunk.param_groups() for chunk in self.chunks]
        self.trainable = freeze_groups({g: [p for pg in groups for p in pg[g]] for g in groups[0]}, cfg.model.freeze)
        self.optimizer: MasterAdamW | MegatronOptimizer
        self.ddps: list[DistributedDataParallel] = []
        """megatron DDP of every chunk (``parallel.distributed_optimizer``), else empty."""
        if cfg.parallel.distributed_optimizer:
            o = cfg.optim
            ddp, self.optimizer = wrap_ddp_and_optimizer(
                self.model, lr=o.lr, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2), eps=o.eps,
                clip_grad=o.grad_clip, distributed_optimizer=True)
            self.ddps = ddp if isinstance(ddp, list) else [ddp]
        else:
            self.optimizer = MasterAdamW(self.trainable, cfg.optim)
        self.fault = _fault_injection("VLR_INJECT_NAN")
        self.hang = _fault_injection("VLR_INJECT_HANG")
        self.recent_losses: deque[float] = deque(maxlen=50)

        self.preprocessor = Preprocessor(self.model_dir, max_length=cfg.data.max_length)
        cache = cfg.data.cache_prepared == "always" or (cfg.data.cache_prepared == "auto" and not cfg.data.train)
        train_preprocessor = CachedPreprocessor(self.preprocessor) if cache else self.preprocessor
        if cfg.data.validate:
            self._validate(sources.train, train_preprocessor)
        self.loader = PairLoader(
            sources.train, train_preprocessor,
            LoaderConfig(pairs_per_step=cfg.train.pairs_per_step, token_budget=cfg.data.micro_batch_tokens,
                         seed=cfg.train.seed, shared_prompt=cfg.data.shared_prompt,
                         num_workers=cfg.data.num_workers),
            rank=ctx.dp_rank, world_size=ctx.dp)
        self.total_steps = cfg.train.max_steps or max(
            1, math.ceil(cfg.train.epochs * self.loader.num_rows / cfg.train.pairs_per_step))
        self.eval_sets = [load_eval_set(name, files, self.preprocessor, max(1, cfg.train.pairs_per_step // ctx.dp))
                          for name, files in sources.evals.items()]
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints")
        # this rank's launch-tuner picks: reloaded on a restart so the resumed run launches the same kernels
        self.tuning_file = self.run_dir / "tuning" / f"rank{ctx.rank:05d}.json"
        self._tuned = 0
        if self.tuning_file.exists():
            log.info("launch-tuner choices: %d loaded from %s", _tune.load_choices(self.tuning_file),
                     self.tuning_file)
        self.step = 0
        self._resume()
        self._batches = iter(self.loader)  # a generator: it reads the (resumed) loader position at its first step
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=ctx.rank == 0,
                                  total_steps=self.total_steps, first_step=self.step, progress=cfg.log.progress,
                                  wandb_config=to_dict(cfg) if cfg.log.wandb else None)
        self.hf_config = json.loads((self.model_dir / "config.json").read_text())
        self.peak_flops = peak_flops_for(torch.cuda.get_device_name(ctx.device)) if ctx.device.type == "cuda" \
            else None
        self.metrics.message(
            f"vlr_runtime.train: {self.loader.num_rows} training rows, {self.total_steps} steps of "
            f"{cfg.train.pairs_per_step} pairs, "
            f"tp={ctx.tp} pp={ctx.pp}{f' vpp={ctx.vpp}' if ctx.vpp > 1 else ''} dp={ctx.dp}"
            f"{' (megatron distributed optimizer)' if self.ddps else ''} "
            f"on {ctx.device} ({ctx.backend}), {self.dtype}, "
            f"{sum(p.numel() for p in self.trainable)} trainable parameters on this rank, run dir {self.run_dir}")
        for es in self.eval_sets:
            if es.dropped:
                self.metrics.message(f"evaluation set {es.name!r}: unusable rows skipped, by reason: "
                                     f"{dict(es.dropped)}")

    def _validate(self, files: list[str], preprocessor) -> None:
        """Rank 0 runs the data package's validation pass over the training files and prints the outcome counts by
        reason (with the caching preprocessor this also prepares rank 0's pairs); the other ranks wait."""
        if self.ctx.rank == 0:
            budget = None if self.cfg.data.shared_prompt else self.cfg.data.micro_batch_tokens
            report = validate_data(files, preprocessor, token_budget=budget)
            print(f"vlr_runtime.train: training data {files}\n{format_report(report)}", flush=True)
            failed = report.ok == 0
        else:
            failed = False
        if self.ctx.world_size > 1:
            flag = [failed]
            dist.broadcast_object_list(flag, src=0)
            failed = flag[0]
        if failed:
            raise ValueError(f"no usable training pair in {files} (see the validation report)")

    # ----------------------------------------------------------------------------------------------- one step
    def compute_gradients(self, batches: list[tuple[PackedBatch, int]], global_pairs: int) -> dict:
        """Forward + backward over this rank's micro-batches ``(batch, pairs in it)`` of a step holding
        ``global_pairs`` pairs over all DP ranks, so that the gradient is that of the mean loss over the step's
        pairs (whatever the micro-batch sizes, TP/PP/DP layout); gradients reduced over DP. Returns the step's
        statistics reduced over DP and the global gradient norm (identical on every rank; ``None`` with the megatron
        optimizer, which computes it in its step). Raises :class:`TrainingDiverged` on every rank, before any
        optimizer touches anything, when a loss or a gradient is not finite on any rank. Collective: every rank
        must call it once per step."""
        ctx = self.ctx
        self._zero_grad()
        microbatches = []
        for batch, pairs in batches:
            if not self.cfg.train.use_margin:
                batch.margin = None
            microbatches.append((batch.to(ctx.device), pairs))
        if ctx.vpp > 1 and microbatches and len(microbatches) % ctx.pp:
            # megatron's interleaved schedule runs micro-batches in groups of pp: pad with zero-weight copies of the
            # last micro-batch (each costs one extra forward/backward; their gradient contribution is exactly 0).
            pad = ctx.pp - len(microbatches) % ctx.pp
            microbatches += [(dataclasses.replace(microbatches[-1][0]), 0) for _ in range(pad)]
        # forward_backward averages over this rank's micro-batches and DP over the ranks; this factor turns both
        # into the mean over the step's pairs.
        weights = {id(b): len(microbatches) * ctx.dp * pairs / global_pairs for b, pairs in microbatches}
        if self.fault == (ctx.rank, self.step + 1):
            weights = dict.fromkeys(weights, math.nan)
        # [loss_sum, correct, pairs, margin_sum, chosen_sum, rejected_sum, tokens, images]
        stats = torch.zeros(8, dtype=torch.float64)
        if microbatches:  # every stage of a pipeline holds the same batches, so all of them skip together
            with _weighted_loss(self.chunks, weights):
                results = forward_backward(self._ddp_or_model(), [b for b, _ in microbatches],
                                           center_coef=self.cfg.train.center_coef)
            for (batch, pairs), res in zip(microbatches, results):
                if pairs == 0:  # a padding copy
                    continue
                rewards = res.rewards.double().cpu()
                chosen, rejected = rewards[batch.pair_index[:, 0].cpu()], rewards[batch.pair_index[:, 1].cpu()]
                stats += torch.tensor([float(res.loss) / weights[id(batch)] * pairs, (chosen > rejected).sum(),
                                       chosen.numel(), (chosen - rejected).sum(), chosen.sum(), rejected.sum(),
                                       batch.num_tokens, batch.num_images], dtype=torch.float64)
        self._stop_if_not_finite(stats[0], [b for b, n in microbatches if n])
        if self.ddps:
            for ddp in self.ddps:
                ddp.finish_grad_sync()
            grad_norm = None
        else:
            from megatron.core import parallel_state

            average_dp_gradients(self.trainable, ctx.dp, ctx.dp_group)
            grad_norm = global_grad_norm(self.trainable, ctx.tp_rank, parallel_state.get_model_parallel_group())
        if ctx.dp > 1:
            stats = stats.to(ctx.device)
            dist.all_reduce(stats, group=ctx.dp_group)
            stats = stats.cpu()
        loss_sum, correct, pairs, margin, chosen_sum, rejected_sum, tokens, images = stats.tolist()
        # tokens/images are counted once per DP replica: TP peers and pipeline stages process the same batch.
        return {"loss": loss_sum / pairs, "accuracy": correct / pairs, "margin": margin / pairs,
                "chosen_reward": chosen_sum / pairs, "rejected_reward": rejected_sum / pairs,
                "grad_norm": grad_norm, "pairs": int(pairs), "tokens": tokens, "images": images}

    def _ddp_or_model(self):
        """What :func:`forward_backward` runs: the DDP wrapper(s) of the chunk(s), else :attr:`model`."""
        if not self.ddps:
            return self.model
        return self.ddps if self.ctx.vpp > 1 else self.ddps[0]

    def _zero_grad(self) -> None:
        for ddp in self.ddps:
            ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def _stop_if_not_finite(self, loss_sum: torch.Tensor, batches: list[PackedBatch]) -> None:
        """Check this rank's loss and (not yet reduced) gradients; if any rank found a NaN/Inf, every rank raises
        :class:`TrainingDiverged` naming the ranks, the step and the offending ranks' batch ids. One tiny all-gather
        over the world per step; the ids are exchanged only on failure."""
        grads = [getattr(p, "main_grad", None) if self.ddps else p.grad for p in self.trainable]
        grads = [g for g in grads if g is not None]
        # per-tensor norms in one multi-tensor launch (no fp32 copy of every gradient): NaN/Inf in any element
        # makes its tensor's norm, and so the sum, non-finite
        grad_sum = (torch.stack(torch._foreach_norm([g.detach() for g in grads], 2)).float().sum() if grads
                    else torch.zeros(()))
        mine = torch.tensor([not math.isfinite(float(loss_sum)), not math.isfinite(float(grad_sum))],
                            dtype=torch.float32, device=self.ctx.device)
        flags = [mine]
        if self.ctx.world_size > 1:
            flags = [torch.empty_like(mine) for _ in range(self.ctx.world_size)]
            dist.all_gather(flags, mine)
        bad_loss = [r for r, f in enumerate(flags) if f[0]]
        bad_grad = [r for r, f in enumerate(flags) if f[1]]
        if not bad_loss and not bad_grad:
            return
        ids = [[sid for b in batches for sid in b.sample_ids]]
        if self.ctx.world_size > 1:
            ids = [None] * self.ctx.world_size
            dist.all_gather_object(ids, [sid for b in batches for sid in b.sample_ids])
        self._zero_grad()
        first = (bad_loss or bad_grad)[0]
        raise TrainingDiverged(
            f"step {self.step + 1}: non-finite loss on rank(s) {bad_loss}, non-finite gradients on rank(s) "
            f"{bad_grad}; batch ids on rank {first}: {ids[first]}; stopped on every rank before the optimizer step "
            "(parameters are those of the previous step)")

    def _train_step(self) -> dict:
        if self.hang == (self.ctx.rank, self.step + 1):
            time.sleep(3600)
        t0 = time.perf_counter()
        lr = lr_at(self.step + 1, self.total_steps, self.cfg.optim)
        step_batch = next(self._batches)
        data_wait = time.perf_counter() - t0
        if step_batch.global_pairs == 0:
            raise RuntimeError(f"step {self.step + 1}: no usable pair in the step's rows "
                               f"(rejected: {step_batch.rejected_global[:5]})")
        stats = self.compute_gradients(
            [(mb, n) for mb, n in zip(step_batch.microbatches, step_batch.pairs) if mb is not None],
            step_batch.global_pairs)
        tokens, images = stats.pop("tokens"), stats.pop("images")
        if self.ddps:
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_mult", 1.0)
            _, stats["grad_norm"], _ = self.optimizer.step()  # clips to optim.grad_clip inside
        else:
            self.optimizer.set_lr(lr)
            # clipping folded into the optimizer's read of the gradients (no in-place pass over them)
            self.optimizer.step(grad_scale=clip_factor(stats["grad_norm"], self.cfg.optim.grad_clip))
        self._zero_grad()
        self.step += 1
        row = {"step": self.step, **stats, "lr": lr}
        self._check_spike(row["loss"])
        elapsed = time.perf_counter() - t0
        row.update(tokens_per_s=tokens / elapsed, images_per_s=images / elapsed, step_time_s=elapsed,
                   **self._scale_metrics([mb for mb in step_batch.microbatches if mb is not None], elapsed,
                                         data_wait))
        return row

    def _scale_metrics(self, microbatches: list[PackedBatch], elapsed: float, data_wait: float) -> dict:
        """``data_wait_s`` (waiting for the loader), ``peak_mem_gb`` (CUDA: peak allocated by torch on this device;
        CPU: this process's peak RSS), ``pipeline_bubble`` (pp > 1: the 1F1B schedule's idle fraction
        ``(pp - 1) / (m * vpp + pp - 1)`` for ``m`` micro-batches, from the schedule, not timed) and, on a device
        with a known peak, ``mfu_llm`` / ``mfu_vision``: the model FLOPs (:mod:`vlr_runtime.flops`) of THIS rank's
        DP replica over the peak of the ``tp * pp`` devices holding it (rank 0's replica is the one logged)."""
        ctx = self.ctx
        out = {"data_wait_s": data_wait}
        if ctx.device.type == "cuda":
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
        else:
            out["peak_mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
        if ctx.pp > 1:
            m = len(microbatches)
            if ctx.vpp > 1:  # padded to a multiple of pp (see compute_gradients)
                m = -(-m // ctx.pp) * ctx.pp
            out["pipeline_bubble"] = (ctx.pp - 1) / (m * ctx.vpp + ctx.pp - 1)
        if self.peak_flops:
            freeze = self.cfg.model.freeze
            llm = vision = 0.0
            for mb in microbatches:
                f = batch_step_flops(self.hf_config, mb, vision_trained="vision" not in freeze,
                                     merger_trained="merger" not in freeze)
                llm += f.llm + f.head
                vision += f.vision + f.merger
            devices = ctx.tp * ctx.pp
            out.update(mfu_llm=mfu(llm, elapsed, self.peak_flops, devices),
                       mfu_vision=mfu(vision, elapsed, self.peak_flops, devices))
        return out

    def _check_spike(self, loss: float) -> None:
        """Warn (rank 0's log) when ``loss`` exceeds ``train.spike_factor`` x the median of the recent losses."""
        factor = self.cfg.train.spike_factor
        if factor and len(self.recent_losses) >= 5:
            median = statistics.median(self.recent_losses)
            if median > 0 and loss > factor * median:
                self.metrics.message(f"loss spike at step {self.step}: {loss:.4g} > {factor:g} x median "
                                     f"{median:.4g} of the last {len(self.recent_losses)} steps")
        self.recent_losses.append(loss)

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        """Held-out metrics (collective over every rank); empty when the run has no evaluation set."""
        if not self.eval_sets:
            return {}
        for chunk in self.chunks:
            chunk.eval()
        try:
            return evaluate(self.model, self.eval_sets, device=self.ctx.device, dp_rank=self.ctx.dp_rank,
                            dp=self.ctx.dp, dp_group=self.ctx.dp_group)
        finally:
            for chunk in self.chunks:
                chunk.train()

    def _log_eval(self) -> dict:
        result = self.evaluate()
        if result:
            self.metrics.write({"step": self.step, "split": "eval", **result})
            if self.cfg.log.print_eval:
                flat = {**{k: v for k, v in result.items() if k != "accuracy_by_category"},
                        **{f"[{c}]": v for c, v in result.get("accuracy_by_category", {}).items()}}
                self.metrics.message(f"eval @ step {self.step}: " + ", ".join(
                    f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in flat.items()))
        return result

    # ------------------------------------------------------------------------------------- checkpoints
    def _layout(self) -> dict:
        """What a checkpoint records of the run's layout; a resume with the same values reads only its own file."""
        ctx = self.ctx
        return {"tp": ctx.tp, "pp": ctx.pp, "vpp": ctx.vpp, "dp": ctx.dp,
                "optimizer": "distributed" if self.ddps else "master_adamw"}

    def _save_checkpoint(self) -> None:
        """Every rank writes its RNG states, its loader position, its parameters and its own optimizer state (a
        resume on the same layout reads only its own file) and, with ``checkpoint.full_tensors``, its part of the
        layout-independent full tensors (:mod:`reshard`). Collective over every rank."""
        ctx = self.ctx
        tensors = {f"model.{n}": p for chunk in self.chunks for n, p in chunk.named_parameters()}
        state: dict = {"step": self.step, "loader": self.loader.state_dict(), "dp_rank": ctx.dp_rank}
        if not isinstance(self.optimizer, MasterAdamW):
            tensors.update(distributed_shards(self.chunks, self.optimizer))
        else:
            opt_state = self.optimizer.optimizer.state_dict()
            for idx, st in opt_state["state"].items():
                tensors.update({f"optim.{idx}.{k}": torch.as_tensor(v) for k, v in st.items()})
            tensors.update({f"master.{i}": m for i, m in enumerate(self.optimizer.master_copies())})
            state["param_groups"] = opt_state["param_groups"]
        rng_tensors, state["rng"] = capture_rng_state()
        tensors.update({f"rng.{k}": v for k, v in rng_tensors.items()})
        if self.cfg.checkpoint.full_tensors:
            tensors.update(canonical_tensors(self.chunks, self.optimizer, tp_rank=ctx.tp_rank, dp_rank=ctx.dp_rank,
                                             dp_group=ctx.dp_group))
        self.checkpoints.save(self.step, tensors, state,
                              meta={**self._layout(), "full_tensors": self.cfg.checkpoint.full_tensors})

    def _resume(self) -> None:
        """Continue from the newest complete checkpoint of the run directory: on the saved layout (sizes and
        optimizer) from this rank's own file, otherwise from the full tensors of every rank's file."""
        step = latest_complete(self.checkpoints.root)
        if step is None:
            return
        meta = json.loads((step_dir(self.checkpoints.root, step) / COMPLETE).read_text())
        saved = {k: meta.get(k, default) for k, default in
                 (("tp", None), ("pp", None), ("vpp", 1), ("dp", None), ("optimizer", "master_adamw"))}
        if saved != self._layout():
            if not meta.get("full_tensors", True):
                raise ConfigError(
                    f"the latest checkpoint ({step_dir(self.checkpoints.root, step)}) was written with "
                    f"checkpoint.full_tensors false and resumes only on its own layout {saved}; this run is "
                    f"{self._layout()}")
            self._resume_canonical(saved)
            return
        ckpt = self.checkpoints.load_latest()
        t = ckpt.tensors
        with torch.no_grad():
            for chunk in self.chunks:
                for n, p in chunk.named_parameters():
                    p.copy_(t[f"model.{n}"])
        if isinstance(self.optimizer, MasterAdamW):
            with torch.no_grad():
                for i, m in enumerate(self.optimizer.master_copies()):
                    m.copy_(t[f"master.{i}"])
            opt_state: dict = {"state": {}, "param_groups": ckpt.state["param_groups"]}
            for key, value in t.items():
                if key.startswith("optim."):
                    _, idx, name = key.split(".", 2)
                    opt_state["state"].setdefault(int(idx), {})[name] = value
            self.optimizer.optimizer.load_state_dict(opt_state)
        else:
            load_distributed_shards(self.chunks, self.optimizer, t)
        restore_rng_state({k[4:]: v for k, v in t.items() if k.startswith("rng.")}, ckpt.state["rng"])
        self.loader.load_state_dict(ckpt.state["loader"])
        self.step = ckpt.step
        log.info("resumed from %s at step %d", ckpt.path, self.step)

    def _resume_canonical(self, saved: dict) -> None:
        """Resume from the ``full.*`` tensors of every rank's file. The loader position is global (step ``k`` is
        stream positions ``[k*B, (k+1)*B)`` split over however many DP ranks there are), so any DP size continues
        with the same pairs. RNG states (and the per-rank rejected-row counts) come from a saved rank of the same DP
        rank, or of DP rank 0 for a DP rank the saved run did not have."""
        ctx = self.ctx
        ckpt = self.checkpoints.load_latest(all_ranks=True)
        dp_rank = ctx.dp_rank if ctx.dp_rank < saved["dp"] else 0
        states = [json.loads((ckpt.path / f"state-rank{r:05d}.json").read_text())
                  for r in range(ckpt.meta["world_size"])]
        source = next(r for r, st in enumerate(states) if st["dp_rank"] == dp_rank)
        load_canonical(self.chunks, self.optimizer, ckpt.tensors)
        rng = load_file(str(ckpt.path / f"tensors-rank{source:05d}.safetensors"))
        restore_rng_state({k[4:]: v for k, v in rng.items() if k.startswith("rng.")}, states[source]["rng"])
        self.loader.load_state_dict(states[source]["loader"])
        self.step = ckpt.step
        now = self._layout()
        changed = ", ".join(f"{k}={saved[k]}->{now[k]}" for k in now if saved[k] != now[k])
        log.info("resumed from %s at step %d from its full tensors (%s)", ckpt.path, self.step, changed)

    # -------------------------------------------------------------------------------------------- the loop
    def train(self) -> dict:
        """Run the remaining steps; returns the final held-out metrics (``{}`` without an evaluation set)."""
        cfg = self.cfg
        try:
            while self.step < self.total_steps:
                self.metrics.write(self._train_step())
                if len(_tune.choices()) > self._tuned:  # new shapes were tuned during this step
                    _tune.save_choices(self.tuning_file)
                    self._tuned = len(_tune.choices())
                if cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0 \
                        and self.step < self.total_steps:
                    self._log_eval()
                if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                    self._save_checkpoint()
            final = self._log_eval()
            if self.loader.rejected_counts:
                self.metrics.message(f"unusable training rows skipped (this rank), by reason: "
                                     f"{dict(self.loader.rejected_counts)}")
            if cfg.checkpoint.export:
                export_hf_checkpoint(self.model, self.args, self.run_dir / "export", source_dir=self.model_dir)
                self.metrics.message(f"exported to {self.run_dir / 'export'}")
            if final:
                parts = [f"{name} {final[key]:.4f}" for key, name in (
                    ("accuracy_image", "image pairs"), ("accuracy_text", "text pairs"),
                    ("accuracy_noise", "image pairs with noise images"), ("accuracy", "all pairs")) if key in final]
                self.metrics.message("held-out accuracy: " + ", ".join(parts))
            return final
        finally:
            self.loader.close()
            self.checkpoints.wait()
            self.metrics.close()
