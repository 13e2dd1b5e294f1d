"""Input formats: JSONL / Parquet rows, shards, random access for large files, and row parsing.

Accepted row layouts (image paths are relative to the data file's directory unless absolute):

* **pair, conversational** (TRL style): ``prompt`` / ``chosen`` / ``rejected`` are lists of chat messages; ``images``
  lists the image files in placeholder order; optional ``margin`` and ``id``. Without ``prompt`` (TRL "implicit
  prompt"), the longest common message prefix of ``chosen`` and ``rejected`` is the prompt.
* **pair, plain strings**: ``prompt`` / ``chosen`` / ``rejected`` are strings; the images are placed before the prompt
  text, or at each ``<image>`` marker when the prompt has exactly as many markers as images. RewardBench-style text
  rows are this layout with ``subset`` (kept as the pair's ``category``).
* **VL-RewardBench**: ``query``, ``response`` (list), ``human_ranking`` (rank per response, 0 = best), ``image``;
  the category is ``category`` if present, else the ``id`` prefix before its last ``_``.

Rows are addressed through :class:`RowIndex`, which records one byte offset per JSONL line (or row-group position per
Parquet row) in a single streaming pass, so files larger than memory are read one row at a time, in any order.
"""

from __future__ import annotations

import glob
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vlr_runtime.data.errors import DataError
from vlr_runtime.data.types import Message, PairExample, RankExample

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
_IMAGE_MARKER = "<image>"


def expand_shards(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Data files named by ``spec``: a file, a directory (its ``*.jsonl``/``*.parquet``, sorted), a glob pattern, or a
    list of these. Raises ``FileNotFoundError`` when nothing matches (a typo must not train on zero rows)."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    files: list[Path] = []
    for s in specs:
        p = Path(s)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix in DATA_SUFFIXES and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            files += sorted(Path(m) for m in glob.glob(str(s)) if Path(m).suffix in DATA_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no data files match {spec!r}")
    return [f.resolve() for f in files]


@dataclass(frozen=True)
class RowRef:
    """Where a row lives: file number in the index and byte offset (JSONL) or (row group, row) (Parquet)."""

    file: int
    offset: int
    group: int = -1


class RowIndex:
    """Random access to the rows of a set of files without holding them in memory.

    ``index[i]`` returns the row as a dict, or a :class:`DataError` (``bad_json``) for an unparsable line, so that a
    bad line is a counted outcome and not a crash. Picklable (worker processes reopen files lazily).
    """

    def __init__(self, spec: str | Path | Sequence[str | Path]) -> None:
        self.files = expand_shards(spec)
        self.refs: list[RowRef] = []
        for fi, path in enumerate(self.files):
            if path.suffix == ".parquet":
                self._index_parquet(fi, path)
            else:
                self._index_jsonl(fi, path)
        self._cached_group: tuple[int, int, list[dict]] | None = None

    def _index_jsonl(self, fi: int, path: Path) -> None:
        with open(path, "rb") as f:
            if f.read(4096).lstrip().startswith(b"["):
                raise ValueError(f"{path} holds a JSON array; write one JSON object per line (JSONL)")
            f.seek(0)
            offset = 0
            for line in f:
                if line.strip():
                    self.refs.append(RowRef(fi, offset))
                offset += len(line)

    def _index_parquet(self, fi: int, path: Path) -> None:
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            self.refs.extend(RowRef(fi, r, g) for r in range(meta.row_group(g).num_rows))

    def __len__(self) -> int:
        return len(self.refs)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cached_group": None}

    def source(self, i: int) -> tuple[Path, int]:
        """(file, 1-based line number or 0-based parquet row) of row ``i``, for messages and default ids."""
        ref = self.refs[i]
        if ref.group < 0:
            return self.files[ref.file], i - self._first_row(ref.file) + 1
        return self.files[ref.file], i - self._first_row(ref.file)

    def _first_row(self, fi: int) -> int:
        lo, hi = 0, len(self.refs)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.refs[mid].file < fi:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def __getitem__(self, i: int) -> dict | DataError:
        ref = self.refs[i]
        path = self.files[ref.file]
        if ref.group >= 0:
            # Rows of one row group are usually read together (sorted or sequential access); keep the last group.
            if self._cached_group is None or self._cached_group[:2] != (ref.file, ref.group):
                import pyarrow.parquet as pq

                rows = pq.ParquetFile(path).read_row_group(ref.group).to_pylist()
                self._cached_group = (ref.file, ref.group, rows)
            return self._cached_group[2][ref.offset]
        with open(path, "rb") as f:
            f.seek(ref.offset)
            line = f.readline()
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return DataError("bad_json", f"{path.name}:{self.source(i)[1]}: {e}")
        if not isinstance(row, dict):
            return DataError("bad_json", f"{path.name}:{self.source(i)[1]}: a JSON {type(row).__name__}, not an object")
        return row

    def __iter__(self) -> Iterator[dict | DataError]:
        return (self[i] for i in range(len(self)))


def _text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def _is_image_part(part: dict) -> bool:
    return part.get("type") in ("image", "image_url") or "image" in part or "image_url" in part


def normalize_messages(value: object, field: str, default_role: str) -> list[Message]:
    """Messages in the canonical form (``content`` a list of parts). A string becomes one ``default_role`` message."""
    if isinstance(value, str):
        return [{"role": default_role, "content": [_text_part(value)]}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError("bad_field", f"'{field}' must be a string or a list of messages, got {type(value).__name__}")
    out = []
    for m in value:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError("bad_field", f"'{field}' has a message without role/content: {str(m)[:80]}")
        content = m["content"]
        if isinstance(content, str):
            content = [_text_part(content)]
        if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
            raise DataError("bad_field", f"'{field}' message content must be a string or a list of parts")
        parts = []
        for p in content:
            if _is_image_part(p):
                parts.append({"type": "image"})
            elif p.get("type", "text") == "text" and isinstance(p.get("text"), str):
                parts.append(_text_part(p["text"]))
            else:
                raise DataError("bad_field", f"'{field}' has an unsupported content part: {str(p)[:80]}")
        out.append({"role": str(m["role"]), "content": parts})
    return out


def _inline_image_paths(value: object) -> list[str]:
    """Paths given inside image parts (``{"type": "image", "image": "a.png"}``), in order."""
    if not isinstance(value, list):
        return []
    paths = []
    for m in value:
        content = m.get("content") if isinstance(m, dict) else None
        for p in content if isinstance(content, list) else []:
            src = p.get("image") if isinstance(p, dict) else None
            if isinstance(src, str):
                paths.append(src)
    return paths


def count_images(messages: list[Message]) -> int:
    return sum(1 for m in messages for p in m["content"] if p["type"] == "image")


def has_text(messages: list[Message]) -> bool:
    return any(p["type"] == "text" and p["text"].strip() for m in messages for p in m["content"])


def _resolve_images(value: object, base_dir: Path) -> list[Path]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    paths = []
    for item in items:
        if isinstance(item, dict) and item.get("bytes") is not None:
            raise DataError("embedded_image", "images embedded as bytes are not read directly")
        if isinstance(item, dict) and isinstance(item.get("path"), str):
            item = item["path"]
        if isinstance(item, (bytes, bytearray)):
            raise DataError("embedded_image", "images embedded as bytes are not read directly")
        if not isinstance(item, str) or not item:
            raise DataError("bad_field", f"image entries must be non-empty path strings, got {str(item)[:60]}")
        p = Path(item)
        paths.append(p if p.is_absolute() else (base_dir / p).resolve())
    return paths


def _plain_prompt(text: str, n_images: int) -> list[Message]:
    if n_images and text.count(_IMAGE_MARKER) == n_images:
        pieces = text.split(_IMAGE_MARKER)
        parts: list[dict] = []
        for k, piece in enumerate(pieces):
            if piece:
                parts.append(_text_part(piece))
            if k < n_images:
                parts.append({"type": "image"})
        return [{"role": "user", "content": parts}]
    return [{"role": "user", "content": [{"type": "image"} for _ in range(n_images)] + [_text_part(text)]}]


def _require(row: dict, *names: str) -> None:
    for n in names:
        if n not in row or row[n] is None:
            raise DataError("missing_field", f"missing '{n}'")


def _common_prefix(a: list[Message], b: list[Message]) -> int:
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    return n


def parse_pair(row: dict, base_dir: Path, default_id: str) -> PairExample:
    """A pair row (conversational or plain-string) -> :class:`PairExample`; raises :class:`DataError`."""
    _require(row, "chosen", "rejected")
    rid = str(row.get("id", default_id))
    images = _resolve_images(row.get("images", row.get("image")), base_dir)
    if not images:
        images = _resolve_images(
            _inline_image_paths(row.get("prompt")) + _inline_image_paths(row.get("chosen")), base_dir
        )
    if "prompt" in row and row["prompt"] is not None:
        raw = row["prompt"]
        prompt = _plain_prompt(raw, len(images)) if isinstance(raw, str) else normalize_messages(raw, "prompt", "user")
        chosen = normalize_messages(row["chosen"], "chosen", "assistant")
        rejected = normalize_messages(row["rejected"], "rejected", "assistant")
    else:
        if isinstance(row["chosen"], str):
            raise DataError("missing_field", "missing 'prompt' (plain-string pairs need one)")
        full_c = normalize_messages(row["chosen"], "chosen", "assistant")
        full_r = normalize_messages(row["rejected"], "rejected", "assistant")
        k = _common_prefix(full_c, full_r)
        prompt, chosen, rejected = full_c[:k], full_c[k:], full_r[k:]
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not msgs or not has_text(msgs):
            raise DataError("empty_field", f"'{name}' response is empty")
    if not prompt:
        raise DataError("empty_field", "'prompt' is empty")
    n_ph = count_images(prompt) + count_images(chosen)
    if n_ph != len(images) or count_images(rejected) != count_images(chosen):
        raise DataError(
            "placeholder_mismatch",
            f"{n_ph} image placeholders (rejected: {count_images(rejected)}) for {len(images)} images",
        )
    margin = row.get("margin", 0.0)
    if margin is None:
        margin = 0.0
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not math.isfinite(margin):
        raise DataError("bad_field", f"'margin' must be a finite number, got {margin!r}")
    category = row.get("subset", row.get("category", ""))
    return PairExample(
        id=rid, images=images, prompt=prompt, chosen=chosen, rejected=rejected, margin=float(margin),
        category=str(category or ""),
    )


def parse_rank(row: dict, base_dir: Path, default_id: str) -> RankExample:
    """A VL-RewardBench row -> :class:`RankExample`; raises :class:`DataError`."""
    _require(row, "query", "response", "human_ranking")
    rid = str(row.get("id", default_id))
    images = _resolve_images(row.get("image", row.get("images")), base_dir)
    responses_raw, ranking = row["response"], row["human_ranking"]
    if not isinstance(responses_raw, list) or len(responses_raw) < 2:
        raise DataError("bad_field", "'response' must be a list of at least 2 responses")
    if not isinstance(ranking, list) or len(ranking) != len(responses_raw) or not all(
        isinstance(r, int) and not isinstance(r, bool) for r in ranking
    ):
        raise DataError("bad_field", "'human_ranking' must be a list of ints, one per response")
    if not isinstance(row["query"], str) or not row["query"].strip():
        raise DataError("empty_field", "'query' is empty")
    responses = [normalize_messages(r, "response", "assistant") for r in responses_raw]
    if any(not has_text(r) for r in responses):
        raise DataError("empty_field", "a response is empty")
    category = row.get("category") or (rid.rsplit("_", 1)[0] if "_" in rid else rid)
    return RankExample(
        id=rid, images=images, prompt=_plain_prompt(row["query"], len(images)), responses=responses,
        human_ranking=list(ranking), category=str(category),
    )


def parse_row(row: dict | DataError, base_dir: Path, default_id: str) -> PairExample | RankExample:
    """Dispatch on the row's layout. Raises :class:`DataError` for anything unusable."""
    if isinstance(row, DataError):
        raise row
    if "human_ranking" in row or "query" in row:
        return parse_rank(row, base_dir, default_id)
    if "chosen" in row or "rejected" in row or "prompt" in row:
        return parse_pair(row, base_dir, default_id)
    raise DataError("unknown_format", f"keys {sorted(row)[:8]} match no accepted layout")


def read_examples(
    spec: str | Path | Sequence[str | Path],
) -> Iterator[tuple[str, PairExample | RankExample | DataError]]:
    """Stream ``(row id, example or DataError)`` over every row of ``spec`` in file order."""
    index = RowIndex(spec)
    for i in range(len(index)):
        path, line = index.source(i)
        default_id = f"{path.name}:{line}"
        raw = index[i]
        try:
            ex = parse_row(raw, path.parent, default_id)
            yield ex.id, ex
        except DataError as e:
            rid = raw.get("id", default_id) if isinstance(raw, dict) else default_id
            yield str(rid), e


def example_from_row(index: RowIndex, i: int) -> PairExample | RankExample:
    """Parse row ``i`` of ``index`` (raises :class:`DataError`)."""
    path, line = index.source(i)
    return parse_row(index[i], path.parent, f"{path.name}:{line}")


def row_id(index: RowIndex, i: int) -> str:
    """The id of row ``i`` (its ``id`` field, else ``file:line``), even for rows that fail to parse."""
    raw = index[i]
    path, line = index.source(i)
    return str(raw.get("id", f"{path.name}:{line}")) if isinstance(raw, dict) else f"{path.name}:{line}"


__all__ = [
    "RowIndex",
    "count_images",
    "example_from_row",
    "expand_shards",
    "normalize_messages",
    "parse_pair",
    "parse_rank",
    "parse_row",
    "read_examples",
    "row_id",
]
