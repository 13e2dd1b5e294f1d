"""Build a small Qwen2.5-VL-compatible tokenizer directory from a list of texts.

The result has the same *shape* as the real Qwen2.5-VL tokenizer, only a much smaller BPE vocabulary:

- the byte-level BPE pipeline of ``Qwen2Tokenizer`` (NFC normalizer, Qwen's pre-tokenization regex, byte-level
  alphabet without prefix space, no unknown token) so that transformers, which rebuilds ``Qwen2Tokenizer`` from the
  vocabulary and merges, tokenizes exactly as the ``tokenizers`` object written here;
- the Qwen2.5-VL added tokens, in Qwen's order, right after the BPE vocabulary (Qwen puts ``<|endoftext|>`` at
  151643, the first id after its 151643 BPE entries), with the same special/non-special roles;
- ``tokenizer_config.json`` with Qwen2.5-VL-Instruct's roles: ``eos_token=<|im_end|>``, ``pad_token=<|endoftext|>``,
  no BOS/UNK;
- the Qwen2.5-VL chat template (default system prompt ``You are a helpful assistant.``, one
  ``<|vision_start|><|image_pad|><|vision_end|>`` per image part).

Used by the synthetic default dataset, the test fixtures and anyone who needs a tokenizer without the HF hub.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# Qwen2's pre-tokenization regex (contractions, letters with one leading non-letter, single digits, punctuation runs,
# newlines, whitespace): the same string transformers' Qwen2Tokenizer installs.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# (token, special) in Qwen2.5-VL's id order (151643 ...). Special tokens are never split and are skipped when
# decoding with skip_special_tokens; the tool-call / FIM tokens are plain added tokens in Qwen's config.
QWEN2_5_VL_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# The Qwen2.5-VL chat template. A system turn with the default prompt is inserted when the first message is not a
# system message; string contents are emitted as is; image / video parts become vision placeholders (optionally
# numbered with add_vision_id); add_generation_prompt opens an assistant turn.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ChatTemplateFile = Literal["jinja", "json", "tokenizer_config"]


def build_tokenizer(
    out_dir: str | Path,
    texts: Iterable[str],
    *,
    vocab_size: int = 512,
    min_frequency: int = 2,
    chat_template_file: ChatTemplateFile = "jinja",
    model_max_length: int = 32768,
) -> Path:
    """Train a byte-level BPE on ``texts`` and write a Qwen2.5-VL style tokenizer directory.

    Args:
        out_dir: directory to write (created if missing; existing tokenizer files are overwritten).
        texts: training corpus. Any text tokenizes (the 256-byte alphabet is always in the vocabulary); the corpus
            only decides which merges exist.
        vocab_size: size of the BPE vocabulary *before* the 22 added tokens; at least 256 (the byte alphabet).
        min_frequency: minimum pair count for a merge.
        chat_template_file: where the chat template goes: ``"jinja"`` -> ``chat_template.jinja`` (transformers 5
            layout), ``"json"`` -> ``chat_template.json`` (read by processors) *and* the ``chat_template`` key of
            ``tokenizer_config.json`` (read by tokenizers): the layout of the released Qwen2.5-VL repositories;
            ``"tokenizer_config"`` -> only the ``chat_template`` key of ``tokenizer_config.json``.
        model_max_length: written to ``tokenizer_config.json``.

    Returns:
        ``out_dir`` as a Path. The ids of the added tokens are ``bpe_vocab_size + k`` in Qwen's order; read them back
        with :func:`special_token_ids`.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be >= 256 (the byte-level alphabet), got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    if chat_template_file not in ("jinja", "json", "tokenizer_config"):
        raise ValueError(f"chat_template_file must be 'jinja', 'json' or 'tokenizer_config', got {chat_template_file!r}")
    corpus = list(texts)
    if not all(isinstance(t, str) for t in corpus):
        raise TypeError("texts must be strings")

    tokenizer = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                                     fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    # Added tokens are matched on the raw text (normalized=False) as in Qwen's tokenizer.json.
    tokenizer.add_tokens([
        AddedToken(tok, special=special, normalized=False, single_word=False, lstrip=False, rstrip=False)
        for tok, special in QWEN2_5_VL_ADDED_TOKENS
    ])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))

    config: dict = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "extra_special_tokens": [tok for tok, special in QWEN2_5_VL_ADDED_TOKENS[1:14] if special],
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "model_max_length": model_max_length,
    }
    for name in ("chat_template.jinja", "chat_template.json"):
        (out / name).unlink(missing_ok=True)
    if chat_template_file == "jinja":
        (out / "chat_template.jinja").write_text(QWEN2_5_VL_CHAT_TEMPLATE, encoding="utf-8")
    elif chat_template_file == "json":
        (out / "chat_template.json").write_text(
            json.dumps({"chat_template": QWEN2_5_VL_CHAT_TEMPLATE}, indent=2), encoding="utf-8")
        config["chat_template"] = QWEN2_5_VL_CHAT_TEMPLATE
    else:
        config["chat_template"] = QWEN2_5_VL_CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def special_token_ids(tokenizer_dir: str | Path) -> dict[str, int]:
    """Ids of the Qwen2.5-VL added tokens in a directory written by :func:`build_tokenizer` (or a real one).

    Returns ``{token: id}`` for every token of :data:`QWEN2_5_VL_ADDED_TOKENS` that the tokenizer holds; model
    configs take ``image_token_id``, ``video_token_id``, ``vision_start_token_id``... from here.
    """
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {tokenizer_dir}")
    added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens", [])
    by_content = {entry["content"]: int(entry["id"]) for entry in added}
    return {tok: by_content[tok] for tok, _ in QWEN2_5_VL_ADDED_TOKENS if tok in by_content}
