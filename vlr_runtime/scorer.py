"""Embeddable reward scoring: ``RewardScorer(model_dir).score(conversations, images) -> rewards``.

For RL trainers (PPO/GRPO) and the scoring CLI (:mod:`vlr_runtime.score`), which share everything here: the model
directory is loaded once (:func:`vlr_runtime.checkpoint.hf.load_hf_checkpoint`, any TP size), conversations go
through the training preprocessing (:class:`vlr_runtime.data.collate.Preprocessor`: the directory's tokenizer, chat
template and image processor settings), are packed without padding into batches of at most ``batch_tokens`` LLM
tokens, and the reward is the head applied to the final-normed hidden state of each conversation's last token.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image

from vlr_runtime.data.collate import Preprocessor, ProcessedExample, collate, split_scores
from vlr_runtime.data.errors import DataError
from vlr_runtime.data.formats import normalize_messages
from vlr_runtime.data.images import to_rgb
from vlr_runtime.data.processor import process_image
from vlr_runtime.data.types import Message, ProcessedImage

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

ImageInput = str | Path | Image.Image


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` or a torch dtype -> the torch dtype (clear error otherwise)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of {sorted(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def token_batches(examples: Sequence[ProcessedExample], batch_tokens: int, *,
                  shared_prompt: bool = False) -> Iterator[list[ProcessedExample]]:
    """Consecutive groups of ``examples`` (input order kept) of at most ``batch_tokens`` LLM tokens each. An example
    that alone exceeds the budget is scored alone rather than refused: scoring has no memory plan to protect."""
    if batch_tokens <= 0:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    group: list[ProcessedExample] = []
    used = 0
    for ex in examples:
        n = ex.num_tokens(shared_prompt)
        if group and used + n > batch_tokens:
            yield group
            group, used = [], 0
        group.append(ex)
        used += n
    if group:
        yield group


class RewardScorer:
    """A loaded reward model plus its preprocessing; batched, no-grad scoring.

    Args:
        model_dir: HF Qwen2.5-VL directory with a reward head (``value_head.safetensors`` or ``score.weight``), its
            tokenizer + chat template and ``preprocessor_config.json``. A directory without a head is refused: its
            scores would be noise.
        dtype: parameter/compute dtype (``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype); rewards
            are returned in float32 either way.
        device: ``None`` = what :func:`vlr_runtime.parallel.setup_distributed` picks (``cuda:LOCAL_RANK`` when
            CUDA is available, else the CPU); ``"cpu"`` forces the CPU.
        batch_tokens: LLM-token budget of one packed forward.
        tp: tensor-parallel size. Sets up (or reuses) the process groups; with ``tp > 1`` every rank of the TP
            group must make the same calls with the same inputs (as under ``torchrun``).
        shared_prompt: pack each *pair* as ``[prompt | chosen | rejected]`` (the prompt computed once). Only
            :meth:`score_examples` sees pairs; :meth:`score` scores independent conversations.
        max_length: per-conversation token limit (None = unlimited); longer ones raise ``DataError(over_length)``.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str | torch.dtype = "float32",
        device: str | None = None,
        batch_tokens: int = 16384,
        tp: int = 1,
        shared_prompt: bool = False,
        max_length: int | None = None,
    ) -> None:
        from vlr_runtime.checkpoint.hf import load_hf_checkpoint
        from vlr_runtime.model import ModelArgs, build_reward_model
        from vlr_runtime.parallel import setup_distributed

        if device not in (None, "cpu", "cuda"):
            raise ValueError(f"device must be None, 'cpu' or 'cuda', got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was requested but CUDA is not available")
        if batch_tokens <= 0:
            raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.model_dir} has no config.json: not a model directory")
        self.dtype = resolve_dtype(dtype)
        self.batch_tokens = batch_tokens
        self.shared_prompt = shared_prompt
        self.context = setup_distributed(tp, device="cpu" if device == "cpu" else None)
        self.device = self.context.device
        self.preprocessor = Preprocessor(self.model_dir, max_length=max_length)
        args = ModelArgs.from_hf_config(self.model_dir)
        if args.image_token_id != self.preprocessor.image_token_id:
            raise ValueError(f"{self.model_dir}: config.json image_token_id {args.image_token_id} != the tokenizer's "
                             f"<|image_pad|> id {self.preprocessor.image_token_id}")
        # seed=None: no random init, every parameter is overwritten by the checkpoint.
        self.model = build_reward_model(args, dtype=self.dtype, device=self.device, seed=None)
        info = load_hf_checkpoint(self.model, self.model_dir)
        if info["head"] == "initialised":
            raise ValueError(f"{self.model_dir} has no reward head (value_head.safetensors or score.weight): "
                             "a freshly initialised head would give meaningless scores")
        self.head_source: str = info["head"]
        self.model.eval()
        self.merge_size = args.vision.spatial_merge_size
        log.info("reward model %s loaded (%s head, %s, tp=%d, %s)", self.model_dir, self.head_source,
                 self.dtype, tp, self.device)

    @torch.no_grad()
    def score_examples(self, examples: Sequence[ProcessedExample]) -> list[list[float]]:
        """Scores of preprocessed examples: per example, one float per sequence (pair: chosen, rejected)."""
        out: list[list[float]] = []
        for group in token_batches(examples, self.batch_tokens, shared_prompt=self.shared_prompt):
            batch = collate(group, image_token_id=self.preprocessor.image_token_id, merge_size=self.merge_size,
                            shared_prompt=self.shared_prompt)
            if batch.pixel_values is not None:
                batch.pixel_values = batch.pixel_values.to(self.dtype)
            rewards = self.model.rewards(batch.to(self.device))
            out += split_scores(rewards.float().cpu(), group)
        return out

    def _image(self, image: ImageInput) -> ProcessedImage:
        if isinstance(image, Image.Image):
            return process_image(to_rgb(image), self.preprocessor.image_cfg)
        if isinstance(image, (str, Path)):
            return self.preprocessor.images([Path(image)])[0]
        raise TypeError(f"an image must be a path or a PIL image, got {type(image).__name__}")

    def prepare(self, conversation: list[Message] | str, images: Sequence[ImageInput] = ()) -> ProcessedExample:
        """One conversation (messages; the last one is the scored response) -> a preprocessed example.

        Raises:
            DataError: bad messages, unreadable image, placeholder count != ``len(images)``, over-length.
        """
        messages = normalize_messages(conversation, "conversation", "user")
        if not messages:
            raise DataError("empty_field", "the conversation has no messages")
        processed = [self._image(im) for im in images]
        # The split only matters to the truncation policy; a one-message conversation is all "prompt".
        prompt, response = (messages[:-1], messages[-1:]) if len(messages) > 1 else (messages, [])
        seq, _, cut = self.preprocessor.tokenizer.encode(prompt, response, [p.grid_thw for p in processed])
        return ProcessedExample(id="", images=processed, sequences=[seq], is_pair=False, truncated=int(cut))

    def score(self, conversations: Sequence[list[Message] | str],
              images: Sequence[Sequence[ImageInput] | None] | None = None) -> torch.Tensor:
        """Rewards of ``N`` conversations.

        Args:
            conversations: ``N`` chat conversations in the transformers format (``{"role", "content"}`` messages,
                ``{"type": "image"}`` parts as placeholders); the reward scores the whole conversation.
            images: ``N`` lists of images (paths or PIL images) in placeholder order; ``None`` = no images at all.
        Returns:
            ``[N]`` float32 rewards on the CPU.
        Raises:
            ValueError (``DataError``) naming the conversation index for any conversation that cannot be scored.
        """
        if images is None:
            images = [None] * len(conversations)
        if len(images) != len(conversations):
            raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
        examples = []
        for i, (conv, ims) in enumerate(zip(conversations, images)):
            try:
                examples.append(self.prepare(conv, ims or ()))
            except DataError as e:
                raise DataError(e.reason, f"conversation {i}: {str(e).split(': ', 1)[-1]}") from None
        if not examples:
            return torch.zeros(0, dtype=torch.float32)
        return torch.tensor([s[0] for s in self.score_examples(examples)], dtype=torch.float32)
