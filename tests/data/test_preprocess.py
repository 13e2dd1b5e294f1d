"""Images, processor, tokenization and collation against stock transformers (PIL image processor, tokenizer,
get_rope_index)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from tests.data.helpers import make_model_dir, pair_row, write_image, write_jsonl
from tests.data.hf_reference import hf_rope_index
from vlr_runtime.data.collate import Preprocessor, collate, split_scores
from vlr_runtime.data.errors import DataError
from vlr_runtime.data.formats import read_examples
from vlr_runtime.data.images import decode_image
from vlr_runtime.data.processor import ImageProcessorConfig, process_image


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize(
    "size,mode,pixels",
    [((37, 53), "RGB", (3136, 28 * 28 * 24)), ((301, 17), "RGBA", (3136, 28 * 28 * 24)), ((5, 5), "L", (3136, 50000)),
     ((1000, 999), "RGB", (3136, 28 * 28 * 64)), ((29, 400), "LA", (1000, 28 * 28 * 30)),
     ((64, 63), "P", (3136, 9000))],
)
def test_processor_matches_hf_pil_processor(tmp_path, size, mode, pixels) -> None:
    min_px, max_px = pixels
    d = make_model_dir(tmp_path, min_pixels=min_px, max_pixels=max_px)
    path = write_image(tmp_path / "im.png", *size, mode=mode, seed=sum(size))
    hf = AutoImageProcessor.from_pretrained(d)
    assert type(hf).__name__ == "Qwen2VLImageProcessorPil"
    ref = hf(images=[Image.open(path)], return_tensors="pt")
    ours = process_image(decode_image(path), ImageProcessorConfig.from_model_dir(d))
    assert list(ours.grid_thw) == ref["image_grid_thw"][0].tolist()
    assert torch.equal(ours.pixel_values, ref["pixel_values"])  # bit-identical, not just within 1e-6


def test_processor_honours_resample_setting(tmp_path) -> None:
    d = make_model_dir(tmp_path, resample=2)  # bilinear instead of Qwen's bicubic
    path = write_image(tmp_path / "im.png", 83, 41, seed=9)
    ref = AutoImageProcessor.from_pretrained(d)(images=[Image.open(path)], return_tensors="pt")
    cfg = ImageProcessorConfig.from_model_dir(d)
    ours = process_image(decode_image(path), cfg)
    assert torch.equal(ours.pixel_values, ref["pixel_values"])
    bicubic = process_image(decode_image(path), dataclasses.replace(cfg, resample=3))
    assert not torch.equal(bicubic.pixel_values, ref["pixel_values"])


def test_exif_orientation_is_applied(tmp_path) -> None:
    arr = np.zeros((10, 30, 3), dtype=np.uint8)
    arr[:, :5] = 255
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im.save(tmp_path / "r.jpg", exif=exif.tobytes())
    out = decode_image(tmp_path / "r.jpg")
    assert out.size == (10, 30)
    assert np.asarray(out)[:5].mean() > 200  # the white band moved from the left edge to the top


def _reference_ids(tokenizer, messages: list[dict], grids: list[list[int]]) -> list[int]:
    """transformers' processor text expansion done on the string, then tokenized (independent of ours)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    parts = text.split("<|image_pad|>")
    assert len(parts) - 1 == len(grids)
    text = parts[0] + "".join("<|image_pad|>" * (t * h * w // 4) + rest for (t, h, w), rest in zip(grids, parts[1:]))
    return tokenizer(text)["input_ids"]


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_rows_to_packed_batch_match_transformers(tmp_path, model_dir, shared_prompt) -> None:
    write_image(tmp_path / "a.png", 97, 45, seed=1)
    write_image(tmp_path / "b.png", 61, 130, "RGBA", seed=2)
    rows = [pair_row("two", ["a.png", "b.png"]), pair_row("none", [], chosen="Red.", rejected="Blue, not red."),
            pair_row("one", ["b.png"])]
    rows[2]["margin"] = 0.5
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    pre = Preprocessor(model_dir)
    examples = [ex for _, ex in read_examples(data)]
    processed = [pre(ex) for ex in examples]
    batch = collate(processed, image_token_id=pre.image_token_id, shared_prompt=shared_prompt)

    tok = AutoTokenizer.from_pretrained(model_dir)
    hf_proc = AutoImageProcessor.from_pretrained(model_dir)
    ids = batch.input_ids
    cu = batch.cu_seqlens.tolist()
    seg = 0
    image_row = 0
    for ex in examples:
        ref_vision = hf_proc(images=[Image.open(p) for p in ex.images], return_tensors="pt") if ex.images else None
        grids = ref_vision["image_grid_thw"].tolist() if ex.images else []
        if ex.images:
            n = int(ref_vision["pixel_values"].shape[0])
            first = sum(int(g.prod()) for g in batch.image_grid_thw[:image_row])
            assert torch.equal(batch.pixel_values[first : first + n], ref_vision["pixel_values"])
            image_row += len(ex.images)
        refs = [_reference_ids(tok, ex.prompt + r, grids) for r in (ex.chosen, ex.rejected)]
        ref_pos = [
            hf_rope_index(torch.tensor(r), torch.tensor(grids).reshape(-1, 3) if grids else None, pre.image_token_id)
            for r in refs
        ]
        if shared_prompt:
            s, e = cu[seg], cu[seg + 1]
            p, split = int(batch.prefix_lens[seg]), int(batch.split_lens[seg])
            assert ids[s : s + split].tolist() == refs[0]
            assert ids[s + split : e].tolist() == refs[1][p:]
            assert torch.equal(batch.position_ids[:, s : s + split], ref_pos[0])
            assert torch.equal(batch.position_ids[:, s + split : e], ref_pos[1][:, p:])
            seg += 1
        else:
            for r, rp in zip(refs, ref_pos):
                assert ids[cu[seg] : cu[seg + 1]].tolist() == r
                assert torch.equal(batch.position_ids[:, cu[seg] : cu[seg + 1]], rp)
                seg += 1
    assert seg == len(cu) - 1
    # Scored rows are the last token of each conversation; images are stored once per pair.
    assert (ids[batch.scored_index] == ids[batch.scored_index[0]]).all()
    assert batch.image_grid_thw.shape[0] == 3
    assert batch.image_index.tolist() == ([0, 1, 2] if shared_prompt else [0, 1, 0, 1, 2, 2])
    assert batch.pair_index.tolist() == [[0, 1], [2, 3], [4, 5]]
    torch.testing.assert_close(batch.margin, torch.tensor([0.0, 0.0, 0.5]))
    assert split_scores(torch.arange(6.0), processed) == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]


def test_length_policy_never_cuts_image_tokens(tmp_path, model_dir) -> None:
    write_image(tmp_path / "a.png", 97, 45)
    long = "The square is red. " * 40
    data = write_jsonl(tmp_path / "d.jsonl", [pair_row("long", ["a.png"], chosen=long)])
    (ex,) = [e for _, e in read_examples(data)]
    full = Preprocessor(model_dir)(ex)
    n_full = full.sequences[0].input_ids.numel()
    limit = n_full - 30
    with pytest.raises(DataError) as err:
        Preprocessor(model_dir, max_length=limit)(ex)
    assert err.value.reason == "over_length"
    cut = Preprocessor(model_dir, max_length=limit, length_policy="truncate_response")(ex)
    chosen = cut.sequences[0].input_ids
    assert chosen.numel() == limit and cut.truncated == 1
    assert torch.equal(chosen[:-2], full.sequences[0].input_ids[: limit - 2])
    assert torch.equal(chosen[-2:], full.sequences[0].input_ids[-2:])  # "<|im_end|>\n" kept: same scored token
    assert torch.equal(cut.sequences[1].input_ids, full.sequences[1].input_ids)  # short rejected untouched
    n_prompt = int((full.sequences[0].input_ids == Preprocessor(model_dir).image_token_id).nonzero().max()) + 5
    with pytest.raises(DataError, match="prompt alone"):
        Preprocessor(model_dir, max_length=n_prompt, length_policy="truncate_response")(ex)


def test_each_image_is_decoded_once_per_pair(tmp_path, model_dir, monkeypatch) -> None:
    import vlr_runtime.data.collate as collate_module

    write_image(tmp_path / "a.png", 97, 45)
    write_image(tmp_path / "b.png", 40, 40, seed=5)
    data = write_jsonl(tmp_path / "d.jsonl", [pair_row("two", ["a.png", "b.png"])])
    (ex,) = [e for _, e in read_examples(data)]
    calls = []
    real = collate_module.decode_image
    monkeypatch.setattr(collate_module, "decode_image", lambda p, **kw: calls.append(p) or real(p, **kw))
    processed = Preprocessor(model_dir)(ex)
    assert calls == [tmp_path / "a.png", tmp_path / "b.png"]  # chosen and rejected share the decoded images
    assert len(processed.images) == 2 and len(processed.sequences) == 2
