"""A forward and backward of the reward model on a collated batch never makes the host wait for the device.

CPU check (no GPU here): the model runs on the CPU while two modes watch it. "Device data" is what
``PackedBatch.to(device)`` moved, the model's parameters, and everything computed from them (tagged at the dispatcher
level, forward and backward); the host fields the batch keeps and whatever is computed from them alone are host data.
Recorded as a synchronisation, with the repository line that caused it:

- an op on device data that needs its values on the host when it runs on CUDA: ``.item()``/``int()``/``bool()``
  (``aten._local_scalar_dense``), ``nonzero``, ``masked_select``, ``unique*``, ``equal``, ``repeat_interleave``
  without ``output_size``, indexing or ``index_put`` with a boolean mask;
- a read-back of device data: ``.cpu()``, ``.tolist()``, ``.numpy()`` (not ``.to("cpu")``: here the device is
  the CPU, so that call cannot be told from a no-op move);
- a host-to-device copy without ``non_blocking=True`` (``.to(device)``, ``torch.tensor(..., device=)``).

Ops inside ``vlr_kernels`` are not counted: their CPU branches validate index values on the host by design (their
CUDA branches use ``torch._assert_async`` and have their own no-sync GPU tests). Whether a non-blocking copy's
source is page-locked only the GPU test can see. The GPU test runs the same step under torch's sync debug mode.
"""

from __future__ import annotations

import dataclasses
import linecache
import traceback
import warnings
from pathlib import Path
from typing import Self

import pytest
import torch
import vlr_kernels
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vlr_runtime.data.collate import ProcessedExample, collate
from vlr_runtime.data.types import ProcessedImage, ProcessedSequence
from vlr_runtime.data.windows import vision_windows
from vlr_runtime.model import ModelArgs, build_reward_model

REPO = Path(__file__).resolve().parents[2]
KERNELS = Path(vlr_kernels.__file__).resolve().parent
# our source trees: a CI virtualenv may live inside the checkout (.venv-ci), and its torch frames are not ours
OURS = (REPO / "vlr_runtime", REPO / "tests", REPO / "benchmarks")

_SYNC_OPS = {torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero, torch.ops.aten.masked_select,
             torch.ops.aten._unique, torch.ops.aten._unique2, torch.ops.aten.unique_dim,
             torch.ops.aten.unique_consecutive, torch.ops.aten.unique_dim_consecutive, torch.ops.aten.equal}
_INDEX_OPS = {torch.ops.aten.index, torch.ops.aten.index_put, torch.ops.aten.index_put_,
              torch.ops.aten._index_put_impl_}
_READ_BACK = {torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy}
_TAG = "_vlr_device_data"
_RECORDER_FRAMES = {"_record", "__torch_dispatch__", "__torch_function__"}


def _on_device(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _TAG, False)


def _tag(out) -> None:
    for t in tree_leaves(out):
        if isinstance(t, torch.Tensor):
            setattr(t, _TAG, True)


def _synchronises(func, args, kwargs) -> bool:
    packet = func.overloadpacket
    if packet in _SYNC_OPS:
        return True
    if packet is torch.ops.aten.repeat_interleave:
        return kwargs.get("output_size") is None
    if packet in _INDEX_OPS:
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return False


def _to_target(args, kwargs) -> tuple[torch.device | None, bool]:
    """(device, non_blocking) of a ``Tensor.to`` call (device None: a dtype-only conversion)."""
    device, non_blocking = kwargs.get("device"), kwargs.get("non_blocking", False)
    for a in args[1:]:
        if isinstance(a, (str, torch.device)):
            device = a
        elif isinstance(a, torch.Tensor):
            device = a.device
        elif isinstance(a, bool):
            non_blocking = a
            break
    return (None if device is None else torch.device(device)), non_blocking


class SyncRecorder:
    """Context manager recording the synchronisations of the module docstring as ``(what, 'file:line', source)``;
    ``device``: the device the model runs on (a tensor moved there becomes device data)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.events: list[tuple[str, str, str]] = []
        recorder = self

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                on_device = any(_on_device(t) for t in tree_leaves((args, kwargs)))
                if on_device and _synchronises(func, args, kwargs):
                    recorder._record(str(func))
                out = func(*args, **kwargs)
                if on_device:
                    _tag(out)
                return out

        class Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in _READ_BACK and _on_device(args[0]):
                    recorder._record(f"read back: Tensor.{func.__name__}")
                moves_here = False
                if func is torch.Tensor.to and not _on_device(args[0]):
                    target, non_blocking = _to_target(args, kwargs)
                    moves_here = target == recorder.device
                    if moves_here and not non_blocking:
                        recorder._record("blocking host->device copy: Tensor.to")
                elif "device" in kwargs and kwargs["device"] is not None:
                    moves_here = torch.device(kwargs["device"]) == recorder.device
                    if moves_here and func in (torch.tensor, torch.as_tensor):
                        recorder._record(f"blocking host->device copy: torch.{func.__name__}")
                out = func(*args, **kwargs)
                if moves_here:
                    _tag(out)
                elif func is torch.Tensor.cpu and _on_device(args[0]):
                    # on a real device .cpu() makes a new host tensor; here it returns the device tensor itself
                    out = out.clone()
                    delattr(out, _TAG)
                return out

        self._modes = (Function(), Dispatch())

    def _record(self, what: str) -> None:
        stack = [f for f in traceback.extract_stack() if f.name not in _RECORDER_FRAMES]
        if any(Path(f.filename).is_relative_to(KERNELS) for f in stack):
            return
        frames = [f for f in stack if any(Path(f.filename).is_relative_to(d) for d in OURS)]
        outside_tests = [f for f in frames if Path(f.filename).parent != Path(__file__).parent]
        frame = (outside_tests or frames or stack)[-1]
        path = Path(frame.filename)
        rel = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else frame.filename
        self.events.append((what, f"{rel}:{frame.lineno}", linecache.getline(frame.filename, frame.lineno).strip()))

    def __enter__(self) -> Self:
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)


# ------------------------------------------------------------------------------------------------ tiny batches
def _examples(args: ModelArgs) -> list[ProcessedExample]:
    """Two image pairs (one with two images of different grids, windows with partial borders), one text pair,
    one three-response row: shared-prompt segments, plain segments and several placeholder groups."""
    gen = torch.Generator().manual_seed(0)
    img, start, end = args.image_token_id, args.vision_start_token_id, args.vision_end_token_id
    grids = [(1, 10, 12), (1, 4, 6)]
    images = [ProcessedImage(pixel_values=torch.randn(t * h * w, args.vision.patch_dim, generator=gen),
                             grid_thw=(t, h, w)) for t, h, w in grids]

    def text(n: int) -> torch.Tensor:
        return torch.randint(0, img - 10, (n,), generator=gen)

    def group(k: int) -> torch.Tensor:
        t, h, w = grids[k]
        return torch.cat([torch.tensor([start]), torch.full((t * h * w // 4,), img), torch.tensor([end])])

    def seq(prompt: list[torch.Tensor], refs: list[int], n: int) -> ProcessedSequence:
        ids = torch.cat([*prompt, text(n)])
        return ProcessedSequence(input_ids=ids, image_refs=refs, scored_pos=ids.numel() - 1)

    two = [text(3), group(0), text(2), group(1), text(4)]
    one = [text(5), group(0), text(3)]
    plain = [text(6)]
    return [
        ProcessedExample(id="two", images=images, sequences=[seq(two, [0, 1], 5), seq(two, [0, 1], 8)], is_pair=True,
                         prefix_len=sum(p.numel() for p in two), margin=0.5),
        ProcessedExample(id="text", images=[], sequences=[seq(plain, [], 3), seq(plain, [], 7)], is_pair=True,
                         prefix_len=6),
        ProcessedExample(id="one", images=images[:1], sequences=[seq(one, [0], 4), seq(one, [0], 2)], is_pair=True,
                         prefix_len=sum(p.numel() for p in one)),
        ProcessedExample(id="rank", images=images[1:], sequences=[seq([text(2), group(1)], [0], n) for n in (3, 5, 4)],
                         is_pair=False),
    ]


@pytest.fixture(scope="module")
def tiny(tp1):
    if tp1.device.type != "cpu":
        pytest.skip("the CPU check runs where the model runs on the CPU (test_no_host_sync_on_cuda covers CUDA)")
    args = ModelArgs.tiny()
    return args, build_reward_model(args, device="cpu"), _examples(args)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss, rewards, _ = model.loss(batch, center_coef=0.1)
    loss.backward()
    return loss.detach(), rewards.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _without_host_fields(batch):
    return dataclasses.replace(batch, image_grid_thw_host=None, image_token_pos=None, image_token_rows=None)


def _recorded_step(model, batch):
    """Loss, rewards, grads and sync events of one forward+backward of ``batch`` (a host batch) moved to the CPU."""
    device = torch.device("cpu")
    for p in model.parameters():
        _tag(p)
    with SyncRecorder(device) as rec:
        out = _loss_and_grads(model, batch.to(device))
    return out, rec.events


@pytest.fixture(scope="module")
def recorded(tiny):
    """Per layout: (events of the collated batch, events of the same batch without the host fields, both results)."""
    args, model, examples = tiny
    runs = {}
    for layout in ("shared", "plain"):
        batch = collate(examples, image_token_id=args.image_token_id, shared_prompt=layout == "shared")
        fast, fast_events = _recorded_step(model, batch)
        slow, slow_events = _recorded_step(model, _without_host_fields(batch))
        runs[layout] = fast_events, slow_events, fast, slow
    return runs


@pytest.mark.parametrize("layout", ["shared", "plain"])
def test_collated_batch_step_has_no_host_sync(recorded, layout):
    events, _, _, _ = recorded[layout]
    assert events == []


@pytest.mark.parametrize("layout", ["shared", "plain"])
def test_sync_free_path_gives_identical_results(recorded, layout):
    _, _, (loss, rewards, grads), (ref_loss, ref_rewards, ref_grads) = recorded[layout]
    assert torch.equal(loss, ref_loss) and torch.equal(rewards, ref_rewards)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name


@pytest.mark.parametrize("shared", [True, False])
def test_with_image_facts_restores_what_collate_computed(tiny, shared):
    args, _, examples = tiny
    batch = collate(examples, image_token_id=args.image_token_id, shared_prompt=shared)
    rebuilt = _without_host_fields(batch).with_image_facts(image_token_id=args.image_token_id, spatial_merge_size=2)
    for name in ("image_grid_thw_host", "image_token_pos", "image_token_rows"):
        assert torch.equal(getattr(rebuilt, name), getattr(batch, name)), name
    text_only = collate(examples[1:2], image_token_id=args.image_token_id)
    assert text_only.image_grid_thw_host is None and text_only.image_token_pos.numel() == 0
    assert _without_host_fields(text_only).with_image_facts(image_token_id=args.image_token_id,
                                                            spatial_merge_size=2).image_token_rows.numel() == 0


def test_recorder_sees_the_syncs_of_a_hand_built_batch(recorded):
    """The same batch without its host fields takes the old path: the recorder must report its syncs."""
    _, events, _, _ = recorded["shared"]
    seen = {what for what, _, _ in events}
    assert "aten.nonzero.default" in seen and "aten._local_scalar_dense.default" in seen, events
    assert any(where.startswith("vlr_runtime/model/vision.py") for _, where, _ in events), events


def test_recorder_flags_each_kind_and_ignores_host_work():
    cpu = torch.device("cpu")
    host = torch.tensor([2, 0, 1])
    reads = {
        "aten._local_scalar_dense.default": lambda t: int(t.sum()),
        "aten.nonzero.default": lambda t: t.nonzero(),
        "aten.index.Tensor": lambda t: t[t > 0],
        "aten.repeat_interleave.Tensor": lambda t: torch.repeat_interleave(t, t),
        "read back: Tensor.tolist": lambda t: t.tolist(),
        "read back: Tensor.cpu": lambda t: t.cpu(),
    }
    copies = {
        "blocking host->device copy: Tensor.to": lambda non_blocking: torch.ones(2).to(cpu, non_blocking=non_blocking),
        "blocking host->device copy: torch.tensor": lambda non_blocking: (
            torch.tensor([1]).to(cpu, non_blocking=True) if non_blocking else torch.tensor([1], device=cpu)),
    }
    with SyncRecorder(cpu) as rec:  # host data, host-known sizes, non-blocking copies: nothing to report
        dev = host.clone().to(cpu, non_blocking=True)
        for op in reads.values():
            op(host)
        for op in copies.values():
            op(True)
        torch.repeat_interleave(dev, dev, output_size=3)
    assert rec.events == []
    for what, op in [*((w, lambda op=op: op(dev)) for w, op in reads.items()),
                     *((w, lambda op=op: op(False)) for w, op in copies.items())]:
        with SyncRecorder(cpu) as rec:
            op()
        # a boolean mask may reach the dispatcher as a bool index or already as its nonzero()
        allowed = [[what], ["aten.nonzero.default"]] if what == "aten.index.Tensor" else [[what]]
        assert [e[0] for e in rec.events][:1] in allowed, (what, rec.events)
        assert all(e[1].startswith("tests/model/test_host_sync.py:") for e in rec.events)


# ---------------------------------------------------------------------------------------------- checks kept
def test_collate_checks_placeholders_on_the_host(tiny):
    args, _, examples = tiny
    ex = examples[2]
    first = ex.sequences[0]
    img = int((first.input_ids == args.image_token_id).nonzero()[0, 0])
    short = dataclasses.replace(first, input_ids=torch.cat([first.input_ids[:img], first.input_ids[img + 1:]]),
                                scored_pos=first.scored_pos - 1)  # one placeholder fewer
    bad = dataclasses.replace(ex, sequences=[short, ex.sequences[1]])
    with pytest.raises(ValueError, match=r"<\|image_pad\|> tokens but the image groups need .*'one'"):
        collate([bad], image_token_id=args.image_token_id)
    orphan = dataclasses.replace(ex, images=[], sequences=[dataclasses.replace(s, image_refs=[]) for s in ex.sequences])
    with pytest.raises(ValueError, match=r"<\|image_pad\|> tokens but no images"):
        collate([orphan], image_token_id=args.image_token_id)


def test_model_checks_host_fields_against_input_ids(tiny):
    args, model, examples = tiny
    batch = collate(examples, image_token_id=args.image_token_id)
    shifted = batch.image_token_pos.clone()
    shifted[0] -= 1  # a text token instead of the first placeholder
    with pytest.raises(RuntimeError, match="image_token_pos does not list exactly"):
        model.embed(dataclasses.replace(batch, image_token_pos=shifted))
    with pytest.raises(ValueError, match="image_token_rows .* differ"):
        model.embed(dataclasses.replace(batch, image_token_rows=batch.image_token_rows[1:]))
    text_only = collate(examples[1:2], image_token_id=args.image_token_id)
    with pytest.raises(ValueError, match="tokens but no images"):
        model.embed(dataclasses.replace(text_only, image_token_pos=batch.image_token_pos[:2],
                                        image_token_rows=batch.image_token_rows[:2]))


def test_to_keeps_host_fields_on_the_host(tiny):
    args, _, examples = tiny
    batch = collate(examples, image_token_id=args.image_token_id, shared_prompt=True)
    moved = batch.to("meta")
    assert moved.image_grid_thw_host.device.type == "cpu" and torch.equal(moved.image_grid_thw_host,
                                                                          batch.image_grid_thw)
    for f in dataclasses.fields(batch):
        v = getattr(moved, f.name)
        if isinstance(v, torch.Tensor) and f.name != "image_grid_thw_host":
            assert v.device.type == "meta", f.name


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_vision_windows_travel_in_one_buffer(device):
    host = vision_windows(torch.tensor([[1, 10, 12], [2, 4, 6]]))
    moved = host.to(device)
    for f in dataclasses.fields(host):
        a, b = getattr(host, f.name), getattr(moved, f.name)
        if isinstance(a, torch.Tensor):
            assert (b.device.type, b.dtype, b.shape) == (device, a.dtype, a.shape), f.name
            assert device == "meta" or torch.equal(a, b), f.name
        else:
            assert a == b, f.name


# ------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_no_host_sync_on_cuda(tp1):
    """One forward+backward of a collated batch under torch's sync debug mode: no synchronisation (the first
    step compiles/tunes kernels and may synchronise; the second must not)."""
    from vlr_kernels import set_default_backend

    assert tp1.device.type == "cuda"
    set_default_backend(None)  # the module conftest forces the eager "torch" kernels; test the CUDA ones
    try:
        args = ModelArgs.tiny()
        model = build_reward_model(args, device=tp1.device)
        batch = collate(_examples(args), image_token_id=args.image_token_id, shared_prompt=True)
        _loss_and_grads(model, batch.to(tp1.device))
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                _loss_and_grads(model, batch.to(tp1.device))
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        set_default_backend("torch")
    events = []
    for w in caught:
        # torch's once-per-process notice that the debug mode is a prototype is not a synchronisation (which test
        # sees it first depends on the order: under pytest-xdist it was this one, H200 run E)
        if "synchroniz" in str(w.message) and "prototype feature" not in str(w.message):
            path = Path(w.filename).resolve()
            where = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)
            events.append(("sync", f"{where}:{w.lineno}", linecache.getline(w.filename, w.lineno).strip()))
    assert events == []
