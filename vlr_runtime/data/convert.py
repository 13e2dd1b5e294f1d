"""Convert public preference layouts into the pair JSONL of design.md, extracting embedded images to files.

``python -m vlr_runtime.data.convert INPUT [INPUT ...] --out DIR [--layout rlaif-v|vl-rewardbench]
[--prompt-field question] [--chosen-field chosen] [--rejected-field rejected] [--image-field image]
[--id-field idx]``

* ``rlaif-v`` (default; also any ``question/chosen/rejected/image`` table): one plain-string pair per row, the image
  before the question.
* ``vl-rewardbench``: rows keep ``query``/``response``/``human_ranking``/``id``; only the image is extracted.

Images given as bytes (Parquet ``{"bytes", "path"}`` structs, as the HF datasets store them) are written once to
``DIR/images/`` (name from the content hash, extension from the decoded format, so repeated images are stored once);
image paths are rewritten relative to ``DIR``. Rows that lack a field are skipped and counted; the summary goes to
stderr. Output: ``DIR/data.jsonl``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlr_runtime.data.formats import RowIndex


def _save_image(value: object, src_dir: Path, out_dir: Path) -> str:
    """Relative path (from ``out_dir``) of the image ``value`` (bytes, {"bytes", "path"} or a path string)."""
    if isinstance(value, dict):
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
        try:
            with Image.open(io.BytesIO(data)) as im:
                ext = (im.format or "bin").lower()
        except (UnidentifiedImageError, OSError):
            ext = "bin"  # kept as is: the validation pass reports it as unreadable
        name = f"images/{hashlib.sha256(data).hexdigest()[:20]}.{ext}"
        target = out_dir / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return name
    if isinstance(value, str) and value:
        path = Path(value) if Path(value).is_absolute() else src_dir / value
        return os.path.relpath(path.resolve(), out_dir.resolve())
    raise KeyError("image")


def convert_row(row: dict, layout: str, fields: dict[str, str], src_dir: Path, out_dir: Path, default_id: str) -> dict:
    """One input row -> one output row; raises ``KeyError(field)`` when a field is missing."""
    def get(name: str) -> object:
        v = row.get(fields[name])
        if v is None:
            raise KeyError(fields[name])
        return v

    rid = str(row.get(fields["id"], default_id))
    image = row.get(fields["image"])
    images = [] if image is None else [
        _save_image(v, src_dir, out_dir) for v in (image if isinstance(image, list) else [image])
    ]
    if layout == "vl-rewardbench":
        out = {k: v for k, v in row.items() if k not in (fields["image"], "images")}
        for key in ("query", "response", "human_ranking"):
            if out.get(key) is None:
                raise KeyError(key)
        return {**out, "id": rid, "image": images}
    return {"id": rid, "images": images, "prompt": get("prompt"), "chosen": get("chosen"),
            "rejected": get("rejected")}


def convert(
    inputs: Sequence[str | Path], out_dir: str | Path, *, layout: str = "rlaif-v",
    fields: dict[str, str] | None = None,
) -> Counter:
    """Convert ``inputs`` into ``out_dir/data.jsonl``; returns counts (``written`` and ``skipped:<field>``)."""
    if layout not in ("rlaif-v", "vl-rewardbench"):
        raise ValueError(f"layout must be 'rlaif-v' or 'vl-rewardbench', got {layout!r}")
    f = {"prompt": "question", "chosen": "chosen", "rejected": "rejected", "image": "image",
         "id": "id" if layout == "vl-rewardbench" else "idx", **(fields or {})}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = RowIndex(list(inputs))
    counts: Counter = Counter()
    with open(out / "data.jsonl", "w") as sink:
        for i in range(len(index)):
            row = index[i]
            path, line = index.source(i)
            if not isinstance(row, dict):
                counts["skipped:bad_json"] += 1
                continue
            try:
                converted = convert_row(row, layout, f, path.parent, out, f"{path.stem}-{line}")
            except KeyError as e:
                counts[f"skipped:missing {e.args[0]}"] += 1
                continue
            sink.write(json.dumps(converted, ensure_ascii=False) + "\n")
            counts["written"] += 1
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlr_runtime.data.convert", description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", help="JSONL/Parquet files, directories or globs")
    ap.add_argument("--out", required=True, help="output directory (data.jsonl + images/)")
    ap.add_argument("--layout", default="rlaif-v", choices=["rlaif-v", "vl-rewardbench"])
    for name, default in (("prompt", "question"), ("chosen", "chosen"), ("rejected", "rejected"),
                          ("image", "image"), ("id", None)):
        ap.add_argument(f"--{name}-field", default=default)
    args = ap.parse_args(argv)
    fields = {k: getattr(args, f"{k}_field") for k in ("prompt", "chosen", "rejected", "image", "id")}
    fields = {k: v for k, v in fields.items() if v is not None}
    counts = convert(args.inputs, args.out, layout=args.layout, fields=fields)
    print(json.dumps(dict(counts)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
