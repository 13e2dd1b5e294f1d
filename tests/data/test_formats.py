"""Readers (layouts, JSONL/Parquet, shards, random access) and the converter CLI."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.data.helpers import pair_row, write_image, write_jsonl
from vlr_runtime.data.convert import main as convert_main
from vlr_runtime.data.errors import DataError
from vlr_runtime.data.formats import RowIndex, expand_shards, parse_row, read_examples
from vlr_runtime.data.types import PairExample, RankExample


def _text(msgs):
    return [(m["role"], [p.get("text", "<img>") for p in m["content"]]) for m in msgs]


def test_layouts(tmp_path) -> None:
    write_image(tmp_path / "a.png", 20, 20)
    rows = [
        {"id": "plain", "prompt": "Left <image> right <image>?", "chosen": "Yes.", "rejected": "No.",
         "images": ["a.png", str(tmp_path / "a.png")], "margin": 2},
        {"id": "plain-noimg-marker", "prompt": "What?", "chosen": "A.", "rejected": "B.", "images": ["a.png"]},
        {"id": "implicit",
         "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "good"}],
         "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "bad"}]},
        {"id": "inline", "prompt": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                                 {"type": "text", "text": "Q"}]}],
         "chosen": [{"role": "assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]},
        {"prompt": "P", "chosen": "c", "rejected": "r", "subset": "chat-hard"},
        {"id": "RLAIF-V_17", "query": "Describe.", "response": ["r0", "r1"], "human_ranking": [1, 0],
         "image": "a.png"},
        {"id": "bad-margin", "prompt": "P", "chosen": "c", "rejected": "r", "margin": float("nan")},
        {"id": "what", "foo": 1},
        {"id": "ranking", "query": "q", "response": ["a", "b"], "human_ranking": [0]},
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = dict(read_examples(data))
    p = out["plain"]
    assert isinstance(p, PairExample) and p.margin == 2.0 and p.images == [tmp_path / "a.png"] * 2
    assert _text(p.prompt) == [("user", ["Left ", "<img>", " right ", "<img>", "?"])]
    assert _text(out["plain-noimg-marker"].prompt) == [("user", ["<img>", "What?"])]
    imp = out["implicit"]
    assert _text(imp.prompt) == [("user", ["Q?"])] and _text(imp.rejected) == [("assistant", ["bad"])]
    assert out["inline"].images == [tmp_path / "a.png"]
    assert out["d.jsonl:5"].category == "chat-hard"
    rank = out["RLAIF-V_17"]
    assert isinstance(rank, RankExample) and rank.category == "RLAIF-V" and rank.human_ranking == [1, 0]
    assert len(rank.responses) == 2 and rank.images == [tmp_path / "a.png"]
    reasons = {k: v.reason for k, v in out.items() if isinstance(v, DataError)}
    assert reasons == {"bad-margin": "bad_field", "what": "unknown_format", "ranking": "bad_field"}


def test_parquet_shards_and_random_access(tmp_path) -> None:
    shard = tmp_path / "shards"
    shard.mkdir()
    rows = [pair_row(f"j{i}", []) for i in range(5)]
    write_jsonl(shard / "a.jsonl", rows[:3] + ["", "[1, 2]"])
    table = pa.Table.from_pylist([{"id": f"p{i}", "prompt": "P", "chosen": "c", "rejected": "r"} for i in range(7)])
    pq.write_table(table, shard / "b.parquet", row_group_size=3)
    (shard / "notes.txt").write_text("ignored")
    assert [f.name for f in expand_shards(shard)] == ["a.jsonl", "b.parquet"]
    assert [f.name for f in expand_shards(str(shard / "*.parquet"))] == ["b.parquet"]
    with pytest.raises(FileNotFoundError):
        expand_shards(tmp_path / "missing*.jsonl")
    (tmp_path / "array.json").write_text(json.dumps([pair_row("x", [])], indent=1))
    with pytest.raises(ValueError, match="JSONL"):
        RowIndex(tmp_path / "array.json")
    index = RowIndex(shard)
    assert len(index) == 3 + 1 + 7  # the blank line is not a row; "[1, 2]" is a (bad) row
    assert isinstance(index[3], DataError) and index[3].reason == "bad_json"
    order = [10, 0, 5, 2, 9, 4]
    ids = [index[i]["id"] for i in order if isinstance(index[i], dict)]
    assert ids == ["p6", "j0", "p1", "j2", "p5", "p0"]
    assert index.source(5) == (shard / "b.parquet", 1)
    import pickle

    assert pickle.loads(pickle.dumps(index))[10]["id"] == "p6"


def test_parse_row_rejects_embedded_images(tmp_path) -> None:
    with pytest.raises(DataError) as e:
        parse_row({"prompt": "P", "chosen": "c", "rejected": "r", "images": [{"bytes": b"\x89PNG", "path": None}]},
                  tmp_path, "x")
    assert e.value.reason == "embedded_image"


def _png_bytes(w: int, h: int, color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def test_converter_rlaif_v_and_vl_rewardbench(tmp_path, capsys) -> None:
    img = _png_bytes(30, 20, (255, 0, 0))
    table = pa.Table.from_pylist([
        {"idx": 0, "question": "Color?", "chosen": "Red.", "rejected": "Blue.", "image": {"bytes": img, "path": "x"}},
        {"idx": 1, "question": "Again?", "chosen": "Red!", "rejected": "Green.", "image": {"bytes": img, "path": "x"}},
        {"idx": 2, "question": "Broken", "chosen": "a", "rejected": None, "image": {"bytes": img, "path": "x"}},
    ])
    pq.write_table(table, tmp_path / "rlaif.parquet")
    out = tmp_path / "out"
    assert convert_main([str(tmp_path / "rlaif.parquet"), "--out", str(out)]) == 0  # the CLI's argument path
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1]) == {
        "written": 2, "skipped:missing rejected": 1}
    assert len(list((out / "images").iterdir())) == 1  # the shared image is stored once
    examples = dict(read_examples(out / "data.jsonl"))
    assert set(examples) == {"0", "1"}
    ex = examples["0"]
    assert isinstance(ex, PairExample) and ex.images[0].is_file() and ex.images[0].suffix == ".png"
    assert _text(ex.prompt) == [("user", ["<img>", "Color?"])]

    vl = pa.Table.from_pylist([{"id": "mathverse_3", "query": "Solve.", "response": ["1", "2"],
                                "human_ranking": [0, 1], "image": {"bytes": img, "path": None}}])
    pq.write_table(vl, tmp_path / "vl.parquet")
    from vlr_runtime.data.convert import convert

    counts = convert([tmp_path / "vl.parquet"], tmp_path / "vl", layout="vl-rewardbench")
    assert counts == {"written": 1}
    (rank,) = [e for _, e in read_examples(tmp_path / "vl" / "data.jsonl")]
    assert isinstance(rank, RankExample) and rank.category == "mathverse" and rank.images[0].is_file()
