"""The one exception type for bad input rows, carrying a stable, countable reason code.

Every stage (reader, image decode, tokenization, packing) raises :class:`DataError` for a row it cannot use; the
loader, the validator and the scorer catch it per row, count it under ``reason`` and carry on. Anything else that
escapes is a bug, not bad data, and is allowed to crash.
"""

from __future__ import annotations

# Reason codes (the keys of the validation report). One place so that the report, the tests and the docs agree.
REASONS = {
    "bad_json": "the line is not a JSON object",
    "unknown_format": "the row matches none of the accepted layouts",
    "missing_field": "a required field (prompt/chosen/rejected/query/response/...) is absent",
    "empty_field": "a field is present but empty (e.g. an empty response)",
    "bad_field": "a field has the wrong type or value",
    "placeholder_mismatch": "the number of image placeholders differs from the number of images",
    "image_missing": "an image file does not exist",
    "image_unreadable": "an image file is empty, not an image, corrupt or truncated",
    "image_bomb": "an image declares more pixels than the decode cap (checked before decoding)",
    "image_aspect_ratio": "an image's aspect ratio exceeds 200",
    "embedded_image": "an image is embedded as bytes; extract it with python -m vlr_runtime.data.convert",
    "over_length": "a sequence or pair exceeds the length limit and may not be truncated (image tokens / policy)",
}


class DataError(ValueError):
    """A row that cannot be used. ``reason`` is one of :data:`REASONS`; the message says what exactly."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise KeyError(f"unknown DataError reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
