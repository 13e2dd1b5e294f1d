"""Process groups and device selection: decided once here, read everywhere else from :class:`ParallelContext`."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vlr_runtime.parallel.compat import activate_cpu_compat

log = logging.getLogger(__name__)

_CONTEXT: ParallelContext | None = None
_SELF_GROUP: dist.ProcessGroup | None = None


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits: world/TP/PP/DP ranks, its device and the collective backend."""

    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    backend: str
    """``"nccl"`` on CUDA, ``"gloo"`` on CPU."""
    vpp: int = 1
    """Virtual pipeline stages (model chunks) per pipeline rank: > 1 selects the interleaved schedule."""

    @property
    def tp_group(self) -> dist.ProcessGroup:
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_group()

    @property
    def dp_group(self) -> dist.ProcessGroup:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group()

    @property
    def pp_group(self) -> dist.ProcessGroup:
        from megatron.core import parallel_state

        return parallel_state.get_pipeline_model_parallel_group()

    @property
    def self_group(self) -> dist.ProcessGroup:
        """A one-rank group holding only this process (for modules that run replicated inside a TP group)."""
        assert _SELF_GROUP is not None
        return _SELF_GROUP

    @property
    def is_first_pp_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def setup_distributed(tp: int = 1, pp: int = 1, *, vpp: int = 1, device: str | None = None,
                      timeout_s: int = 1800) -> ParallelContext:
    """Initialise torch.distributed (torchrun env or a single process), pick the device and backend, and create
    megatron-core's model-parallel groups.

    Device: ``cuda:LOCAL_RANK`` when CUDA is available (backend NCCL), else the CPU (backend gloo, megatron CPU
    compatibility activated). ``device="cpu"`` forces the CPU path on a CUDA machine (no compat patches there).
    ``vpp > 1`` (needs ``pp > 1``): each pipeline rank holds ``vpp`` model chunks (megatron's virtual pipeline).
    Calling it again with the same sizes returns the existing context; other sizes raise.
    """
    global _CONTEXT, _SELF_GROUP
    if _CONTEXT is not None:
        if (_CONTEXT.tp, _CONTEXT.pp, _CONTEXT.vpp) != (tp, pp, vpp):
            raise RuntimeError(f"already set up with tp={_CONTEXT.tp}, pp={_CONTEXT.pp}, vpp={_CONTEXT.vpp}; call "
                               "teardown() first")
        return _CONTEXT
    if tp < 1 or pp < 1:
        raise ValueError(f"tp and pp must be >= 1, got tp={tp}, pp={pp}")
    if vpp < 1 or vpp > 1 and pp == 1:
        raise ValueError(f"vpp must be >= 1, and > 1 only with pp > 1; got vpp={vpp}, pp={pp}")
    rank, world, local_rank = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tp*pp = {tp}*{pp}")
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
        if not torch.cuda.is_available():
            activate_cpu_compat()
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if world == 1 and "MASTER_PORT" not in os.environ:
            # A lone process needs no rendezvous: an in-memory store cannot lose a race for a free TCP port
            # against another job starting on the same machine.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    from megatron.core import parallel_state

    # new_group is collective over the world: every rank creates every one-rank group and keeps its own.
    for r in range(world):
        group = dist.new_group([r])
        if r == rank:
            _SELF_GROUP = group
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        create_gloo_process_groups=backend == "gloo",
    )
    _CONTEXT = ParallelContext(
        rank=rank, world_size=world, local_rank=local_rank, tp=tp, pp=pp, dp=world // (tp * pp),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=dev, backend=backend, vpp=vpp,
    )
    log.info("distributed: %s", _CONTEXT)
    return _CONTEXT


def get_context() -> ParallelContext:
    """The context made by :func:`setup_distributed` (raises if it was not called)."""
    if _CONTEXT is None:
        raise RuntimeError("vlr_runtime.parallel.setup_distributed() has not been called")
    return _CONTEXT


def teardown() -> None:
    """Destroy megatron's groups and the default process group (safe to call twice)."""
    global _CONTEXT, _SELF_GROUP
    from megatron.core import parallel_state

    _SELF_GROUP = None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTEXT = None

