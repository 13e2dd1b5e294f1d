"""Conversation -> token ids with the model directory's own tokenizer and chat template.

Each ``<|image_pad|>`` the template emits is expanded to ``t*h*w / merge**2`` copies (the merged-token count of its
image), which is what transformers' Qwen2.5-VL processor does on the text before tokenizing; because
``<|image_pad|>`` is an added token, expanding after tokenization gives the same ids and is cheaper.

The scored token is the last token of the templated conversation. Length policy for a sequence longer than
``max_length``: ``"drop"`` rejects it (``over_length``); ``"truncate_response"`` cuts the tail of the *response*
text and keeps the template's closing tokens (``<|im_end|>\\n``), so the scored token is still the turn end. Neither
ever cuts through image tokens or the prompt: a sequence whose prompt alone does not fit is rejected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from vlr_runtime.data.errors import DataError
from vlr_runtime.data.types import Message, ProcessedSequence

LengthPolicy = Literal["drop", "truncate_response"]


class ChatTokenizer:
    """Templating + tokenization + placeholder expansion for one model directory.

    Args:
        model_dir: directory with ``tokenizer.json``/``tokenizer_config.json`` and a chat template
            (``chat_template.jinja``/``.json`` or in ``tokenizer_config.json``), as transformers loads it.
        merge_size: spatial merge of the vision tower (``image tokens = t*h*w / merge_size**2``).
        max_length: longest allowed sequence in tokens (None = unlimited).
        length_policy: what to do with a longer sequence (see the module docstring).
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        merge_size: int = 2,
        max_length: int | None = None,
        length_policy: LengthPolicy = "drop",
    ) -> None:
        from transformers import AutoTokenizer

        if length_policy not in ("drop", "truncate_response"):
            raise ValueError(f"length_policy must be 'drop' or 'truncate_response', got {length_policy!r}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{model_dir}: the tokenizer has no chat template")
        ids = {t: self.tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|im_end|>")}
        missing = [t for t, i in ids.items() if i is None or i == self.tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"{model_dir}: tokenizer lacks the Qwen2.5-VL tokens {missing}")
        self.image_token_id = int(ids["<|image_pad|>"])
        self.vision_start_id = int(ids["<|vision_start|>"])
        self.im_end_id = int(ids["<|im_end|>"])
        self.merge_size = merge_size
        self.max_length = max_length
        self.length_policy: LengthPolicy = length_policy

    def template_ids(self, messages: list[Message], *, add_generation_prompt: bool = False) -> list[int]:
        """Token ids of the templated conversation with one ``<|image_pad|>`` per image (not expanded)."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return list(self.tokenizer(text)["input_ids"])

    def _expand(self, ids: list[int], grids: list[tuple[int, int, int]]) -> tuple[list[int], list[int]]:
        """Expand each placeholder; returns (ids, start index of each image group) or raises placeholder_mismatch."""
        n_ph = sum(1 for t in ids if t == self.image_token_id)
        if n_ph != len(grids):
            raise DataError("placeholder_mismatch", f"template has {n_ph} image placeholders for {len(grids)} images")
        out: list[int] = []
        starts: list[int] = []
        k = 0
        for t in ids:
            if t == self.image_token_id:
                gt, gh, gw = grids[k]
                n = gt * gh * gw // self.merge_size**2
                starts.append(len(out))
                out.extend([t] * n)
                k += 1
            else:
                out.append(t)
        return out, starts

    def encode(
        self, prompt: list[Message], response: list[Message], grids: list[tuple[int, int, int]]
    ) -> tuple[ProcessedSequence, int, bool]:
        """Tokenize ``prompt + response``.

        Args:
            grids: patch grid ``(t, h, w)`` of every image placeholder, in order (prompt's, then response's).
        Returns:
            (sequence, response_start, truncated): the sequence with expanded placeholders and ``scored_pos`` =
            its last token; the index where the response's turn starts (after the generation prompt); whether
            the length policy truncated it.
        Raises:
            DataError: ``placeholder_mismatch`` or ``over_length``.
        """
        ids, starts = self._expand(self.template_ids(prompt + response), grids)
        n_prompt_images = sum(1 for m in prompt for p in m["content"] if p["type"] == "image")
        prompt_ids, _ = self._expand(
            self.template_ids(prompt, add_generation_prompt=True), grids[:n_prompt_images]
        )
        response_start = 0
        while response_start < min(len(ids), len(prompt_ids)) and ids[response_start] == prompt_ids[response_start]:
            response_start += 1
        truncated = False
        if self.max_length is not None and len(ids) > self.max_length:
            ids = self._truncate(ids, starts, grids, response_start)
            truncated = True
        seq = ProcessedSequence(
            input_ids=torch.tensor(ids, dtype=torch.int64),
            image_refs=list(range(len(grids))),
            scored_pos=len(ids) - 1,
        )
        return seq, response_start, truncated

    def _truncate(
        self, ids: list[int], starts: list[int], grids: list[tuple[int, int, int]], response_start: int
    ) -> list[int]:
        assert self.max_length is not None
        if self.length_policy == "drop":
            raise DataError("over_length", f"{len(ids)} tokens > max_length {self.max_length} (policy: drop)")
        last_end = len(ids) - 1 - ids[::-1].index(self.im_end_id) if self.im_end_id in ids else len(ids)
        tail = ids[last_end:]
        keep = self.max_length - len(tail)
        if keep <= response_start:
            raise DataError(
                "over_length", f"the prompt alone takes {response_start} of max_length {self.max_length} tokens"
            )
        for s, (gt, gh, gw) in zip(starts, grids):
            if s + gt * gh * gw // self.merge_size**2 > keep:
                raise DataError("over_length", "truncation would cut into an image of the response")
        return ids[:keep] + tail
