"""The tiny Qwen2.5-VL tokenizer: loads in stock transformers, tokenizes like its own tokenizer.json, and renders
conversations exactly as the Qwen2.5-VL chat template does (expected strings written by hand from the documented
format: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``, default system turn, one vision triple per image)."""

import json

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from vlr_runtime.data.tokenizer_builder import QWEN2_5_VL_ADDED_TOKENS, build_tokenizer, special_token_ids

CORPUS = ["What color is the square? Red. Blue. The cat sat on the mat.", "Compare both pictures, 1234!"] * 10
SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
VIS = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"), CORPUS, vocab_size=300, min_frequency=2)


def test_loads_with_qwen_roles(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None and tok.unk_token is None
    ids = special_token_ids(tok_dir)
    assert list(ids) == [t for t, _ in QWEN2_5_VL_ADDED_TOKENS]
    first = ids["<|endoftext|>"]
    # Qwen's order: the added tokens follow the BPE vocabulary consecutively.
    assert list(ids.values()) == list(range(first, first + len(QWEN2_5_VL_ADDED_TOKENS)))
    assert len(tok) == first + len(QWEN2_5_VL_ADDED_TOKENS) <= 300 + len(QWEN2_5_VL_ADDED_TOKENS)
    for name, token_id in ids.items():
        assert tok.convert_tokens_to_ids(name) == token_id
    special = {t for t, s in QWEN2_5_VL_ADDED_TOKENS if s}
    assert set(tok.all_special_tokens) <= special
    assert "<|image_pad|>" in tok.all_special_tokens and "<tool_call>" not in tok.all_special_tokens


def test_transformers_tokenizes_like_tokenizer_json(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    text = (SYS + "<|im_start|>user\n" + VIS * 2 + "Ünïcode  spaces\n\n tabs\t99 'll it's"
            + "<|im_end|>\n<tool_call>x</tool_call>")
    ids = tok(text)["input_ids"]
    assert ids == raw.encode(text).ids
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert ids.count(pad) == 2
    assert tok.decode(ids) == text
    # Special tokens vanish with skip_special_tokens, the non-special tool-call tokens stay.
    assert tok.decode(ids, skip_special_tokens=True) == (
        "system\nYou are a helpful assistant.\nuser\nÜnïcode  spaces\n\n tabs\t99 'll it's\n<tool_call>x</tool_call>")


@pytest.mark.parametrize("layout", ["jinja", "json", "tokenizer_config"])
def test_chat_template_renders_qwen2_5_vl_format(tmp_path, layout):
    d = build_tokenizer(tmp_path, CORPUS, vocab_size=260, chat_template_file=layout)
    files = {p.name for p in d.iterdir()}
    assert ("chat_template.jinja" in files) == (layout == "jinja")
    assert ("chat_template.json" in files) == (layout == "json")
    assert ("chat_template" in json.loads((d / "tokenizer_config.json").read_text())) == (layout != "jinja")
    tok = AutoTokenizer.from_pretrained(d)
    conv = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"},
                                     {"type": "image"}, {"type": "text", "text": " both."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The left is red."}]},
    ]
    assert tok.apply_chat_template(conv, tokenize=False) == (
        SYS + "<|im_start|>user\n" + VIS + "Compare" + VIS + " both.<|im_end|>\n"
        "<|im_start|>assistant\nThe left is red.<|im_end|>\n")
    assert tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True, add_vision_id=True) == (
        SYS + "<|im_start|>user\nPicture 1: " + VIS + "ComparePicture 2: " + VIS + " both.<|im_end|>\n"
        "<|im_start|>assistant\n")
    # An explicit system turn replaces the default one; string contents are emitted verbatim.
    plain = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Yo"}]
    assert tok.apply_chat_template(plain, tokenize=False) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n")


def test_rebuild_switches_template_layout(tmp_path):
    build_tokenizer(tmp_path, CORPUS, vocab_size=260, chat_template_file="json")
    build_tokenizer(tmp_path, CORPUS, vocab_size=260, chat_template_file="jinja")
    assert not (tmp_path / "chat_template.json").exists()
    assert "chat_template" not in json.loads((tmp_path / "tokenizer_config.json").read_text())


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(tmp_path, CORPUS, vocab_size=100)
    with pytest.raises(ValueError, match="min_frequency"):
        build_tokenizer(tmp_path, CORPUS, min_frequency=0)
    with pytest.raises(ValueError, match="chat_template_file"):
        build_tokenizer(tmp_path, CORPUS, chat_template_file="yaml")
    with pytest.raises(TypeError, match="strings"):
        build_tokenizer(tmp_path, ["ok", 3])
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        special_token_ids(tmp_path / "missing")
