"""Checkpoint directories: completion marker, keep-last-k, resume discovery, RNG round trip, kill mid-save, 2 ranks."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tests.ports import free_port
from vlr_runtime.checkpoint.manager import (
    CheckpointManager,
    capture_rng_state,
    complete_steps,
    latest_complete,
    restore_rng_state,
    step_dir,
)


def _tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(5, 7, generator=g), "b": torch.randn(3, generator=g).to(torch.bfloat16)}


@pytest.mark.parametrize("async_write", [False, True])
def test_roundtrip_and_keep_last(tmp_path, async_write):
    mgr = CheckpointManager(tmp_path, keep_last=2, async_write=async_write)
    for step in (10, 20, 30):
        mgr.save(step, _tensors(step), {"step": step, "loader": {"epoch": 1, "index": step * 3}}, meta={"tp": 1})
    mgr.wait()
    assert complete_steps(tmp_path) == [20, 30]
    assert not step_dir(tmp_path, 10).exists()
    ck = mgr.load_latest()
    assert ck.step == 30 and ck.state["loader"]["index"] == 90 and ck.meta["tp"] == 1
    for k, v in _tensors(30).items():
        assert torch.equal(ck.tensors[k], v) and ck.tensors[k].dtype == v.dtype


def test_incomplete_or_corrupt_checkpoints_are_ignored(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=0)
    mgr.save(5, _tensors(5), {"s": 5})
    mgr.save(6, _tensors(6), {"s": 6})
    (step_dir(tmp_path, 6) / "tensors-rank00000.safetensors").write_bytes(b"truncated")  # size no longer matches
    step_dir(tmp_path, 7).mkdir()  # a save that died before writing anything
    assert latest_complete(tmp_path) == 5
    assert mgr.load_latest().state == {"s": 5}


def test_rng_state_roundtrip():
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    tensors, js = capture_rng_state()
    js = json.loads(json.dumps(js))  # what is stored is JSON
    expected = (torch.rand(4), random.random(), np.random.rand(3))
    torch.rand(100), random.random(), np.random.rand(7)
    restore_rng_state(tensors, js)
    got = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(expected[0], got[0]) and expected[1] == got[1] and np.array_equal(expected[2], got[2])


def test_killed_mid_save_leaves_previous_checkpoint_in_use(tmp_path):
    script = textwrap.dedent(f"""
        import os, time, torch
        from pathlib import Path
        from vlr_runtime.checkpoint.manager import CheckpointManager
        def hook(path):
            if "step_00000002" in str(path) and path.suffix == ".json":
                print("WRITING", flush=True)
                time.sleep(60)
        mgr = CheckpointManager(Path({str(tmp_path)!r}), keep_last=0, before_write_file=hook)
        mgr.save(1, {{"w": torch.ones(3)}}, {{"s": 1}})
        mgr.save(2, {{"w": torch.full((3,), 2.0)}}, {{"s": 2}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert (step_dir(tmp_path, 2) / "tensors-rank00000.safetensors").exists()  # the kill really hit mid-save
    ck = CheckpointManager(tmp_path).load_latest()
    assert ck.step == 1 and torch.equal(ck.tensors["w"], torch.ones(3))


def _two_rank_worker(rank, root, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mgr = CheckpointManager(root, keep_last=1, async_write=True)
        mgr.save(3, {f"shard{rank}": torch.full((2,), float(rank))}, {"rank": rank})
        mgr.wait()
        ck = mgr.load_latest()
        assert ck.state == {"rank": rank} and list(ck.tensors) == [f"shard{rank}"]
        union = mgr.load_latest(all_ranks=True)
        assert sorted(union.tensors) == ["shard0", "shard1"]
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_async(tmp_path):
    mp.start_processes(_two_rank_worker, args=(tmp_path, free_port()), nprocs=2, start_method="spawn")
    assert complete_steps(tmp_path) == [3]
    meta = json.loads((step_dir(tmp_path, 3) / "complete.json").read_text())
    assert meta["world_size"] == 2 and len(meta["files"]) == 4
