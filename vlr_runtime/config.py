"""The typed configuration tree of a training run: YAML file + dotted command-line overrides.

One small ``@dataclass(kw_only=True)`` per section; each part of the runtime receives only the section it needs.
The dataclass defaults ARE the tiny default job (``configs/tiny.yaml`` is their dump, checked by a test), so
``torchrun --nproc-per-node 2 -m vlr_runtime.train`` needs no file.

Precedence: dataclass defaults < ``--config F.yaml`` < ``--section.key value`` (or ``--section.key=value``).
Values are coerced to the field's type (``int``, ``float``, ``bool``, ``str``, ``X | None``, ``list[str]``,
``Literal[...]``); ``none``/``null`` sets an optional field to None; lists are comma-separated or YAML lists.
An unknown section or key fails at start-up naming it, with the closest valid key as a suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

FREEZE_GROUPS = ("vision", "merger", "llm", "head")


class ConfigError(ValueError):
    """A bad configuration: unknown key, uncoercible value or failed validation. The message names the key."""


@dataclass(kw_only=True)
class RunConfig:
    dir: str = ""
    """Run directory (config.yaml, metrics.jsonl, checkpoints/, export/). Empty: ``runs/<timestamp>``, decided on
    rank 0 and shared with every rank."""


@dataclass(kw_only=True)
class ModelConfig:
    path: str = ""
    """HF Qwen2.5-VL model directory (config.json, safetensors, tokenizer, preprocessor_config.json; optional
    value_head.safetensors). Empty: the built-in tiny model generated with the synthetic data."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Parameter/compute dtype. ``auto``: bfloat16 on CUDA, float32 on CPU."""
    freeze: list[str] = field(default_factory=list)
    """Module groups whose parameters are frozen (not in the optimizer): any of vision, merger, llm, head."""
    recompute: list[str] = field(default_factory=list)
    """Activation recomputation (checkpointing) per module group: any of ``llm`` (every decoder layer), ``vision``
    (every vision block). Results are unchanged; activation memory drops for one extra forward of those layers."""
    kernel_backend: str = "auto"
    """Default backend of every vlr_kernels op (``auto``, ``triton``, ``cuda``, ``torch``); see vlr_kernels._backend."""


@dataclass(kw_only=True)
class DataConfig:
    train: list[str] = field(default_factory=list)
    """Training pair files (JSONL/Parquet, design.md format). Empty: the built-in synthetic set."""
    eval: list[str] = field(default_factory=list)
    """Held-out pair files. Empty with empty ``train``: the synthetic held-out split (image, text and noise-image
    variants); empty with a user ``train``: no evaluation."""
    cache_dir: str = ""
    """Where the synthetic set and the tiny model are generated at first use. Empty: ``$VLR_CACHE`` or
    ``~/.cache/vlr_runtime``."""
    synthetic_train_pairs: int = 4000
    """Size of the generated training split (image pairs + text pairs)."""
    synthetic_eval_pairs: int = 400
    """Size of the generated held-out split."""
    cache_prepared: Literal["auto", "always", "never"] = "auto"
    """Keep every prepared training pair (decoded, patchified, tokenized) in memory after its first use, so later
    epochs skip preprocessing. ``auto``: always for the built-in synthetic set (a few hundred MB), never for user files."""
    micro_batch_tokens: int = 4096
    """Token budget of one micro-batch (packed LLM tokens, no padding); a pair longer than this is dropped and
    counted. More pairs per step than fit in one micro-batch means gradient accumulation."""
    shared_prompt: bool = True
    """Pack each training pair as one segment ``[prompt | chosen | rejected]`` (the prompt and its image tokens
    once; rejected attends to the prompt and itself) instead of two full sequences."""
    validate: bool = True
    """Before step 1, rank 0 runs the validation pass (``vlr_runtime.data.validate``) over the training files and
    prints the row outcomes by reason; a run with no usable pair stops there."""
    num_workers: int = 0
    """Loader worker processes per rank building whole steps ahead (0: in the training process)."""
    max_length: int = 1024
    """Longest tokenized conversation (prompt + response, image tokens included); longer pairs are dropped and
    counted, never truncated through image tokens."""


@dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 2
    """Tensor-parallel size (megatron-core). Data parallelism spans world_size / (tp * pp) ranks."""
    pp: int = 1
    """Pipeline-parallel size: the decoder layers are split over ``pp`` stages (vision tower on the first, head and
    loss on the last), run with megatron-core's 1F1B schedule over the step's micro-batches."""
    vpp: int = 1
    """Virtual pipeline stages per pipeline rank (needs ``pp > 1``): the decoder is split into ``pp * vpp`` stages,
    rank ``r`` holding stages ``r, r + pp, ...``, run with megatron-core's interleaved 1F1B schedule (a smaller
    bubble for the same micro-batches). Each rank's micro-batches are padded to a multiple of ``pp`` with
    zero-weight copies."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (TP > 1): the decoder's residual stream and norms hold ``T/tp`` tokens per rank."""
    distributed_optimizer: bool = False
    """Use megatron-core's DDP (contiguous gradient buffers) and distributed optimizer (gradient reduce-scatter,
    Adam state and fp32 main parameters sharded over DP, parameter all-gather). False: torch AdamW with fp32 masters
    and one flat DP all-reduce."""
    timeout_s: int = 1800
    """Timeout of every collective (``init_process_group(timeout=...)``): a rank that hangs longer ends the job
    with an error naming the collective instead of blocking forever."""


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 5e-4
    """Peak learning rate of AdamW."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine decay, as a fraction of ``lr``."""
    warmup_steps: int = 50
    """Linear warm-up from 0 to ``lr`` over this many optimizer steps."""
    weight_decay: float = 0.01
    """Decoupled weight decay on matrices (norm weights and biases are not decayed)."""
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm (over all TP/PP shards) to this value; 0 disables clipping."""


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = 0
    """Optimizer steps. 0: ``epochs`` passes over the training set."""
    epochs: float = 5.0
    """Passes over the training set when ``max_steps`` is 0."""
    seed: int = 0
    """Seed of parameter init, data order and synthetic data generation."""
    pairs_per_step: int = 16
    """Pairs per optimizer step over all data-parallel ranks (the global batch). Each rank splits its share into
    micro-batches of at most ``data.micro_batch_tokens`` tokens and accumulates their gradients."""
    use_margin: bool = True
    """Use the per-pair ``margin`` of the data in the loss ``-log sigmoid(r_c - r_r - margin)``."""
    center_coef: float = 0.0
    """Reward-centering coefficient ``c`` of the loss term ``c * mean(r**2)``."""
    spike_factor: float = 5.0
    """Log a warning when a step's loss exceeds this multiple of the median of the last 50 steps' losses (0: off)."""
    eval_interval: int = 250
    """Evaluate on the held-out split every this many optimizer steps (and at the end); 0: only at the end."""


@dataclass(kw_only=True)
class CheckpointConfig:
    interval: int = 0
    """Save a resumable checkpoint every this many optimizer steps (0: never)."""
    full_tensors: bool = True
    """Also write the layout-independent full tensors (HF names) of the parameters, fp32 masters and Adam moments,
    so the checkpoint resumes at another TP/PP/VPP/DP size or with the other optimizer. Writing them gathers a whole
    pipeline stage's state on one process; False (e.g. 72B) writes only each rank's own state, and the checkpoint
    resumes on its own layout only."""
    export: bool = True
    """Export the final model to ``<run.dir>/export/`` (HF Qwen2.5-VL + value_head.safetensors)."""


@dataclass(kw_only=True)
class LogConfig:
    progress: bool = True
    """Show a progress bar on rank 0."""
    print_eval: bool = True
    """Print each evaluation's accuracies on rank 0."""
    wandb: bool = False
    """Also log every metrics line to Weights & Biases (needs the ``wandb`` package; its own env/login settings)."""


@dataclass(kw_only=True)
class Config:
    """The whole run. Sections are passed separately to the parts that need them."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first key whose value cannot work (world-size checks are done by
        the trainer, which knows the world size)."""
        checks = [
            ("parallel.tp", self.parallel.tp >= 1, "must be >= 1"),
            ("parallel.pp", self.parallel.pp >= 1, "must be >= 1"),
            ("parallel.timeout_s", self.parallel.timeout_s >= 1, "must be >= 1"),
            ("parallel.sequence_parallel", not self.parallel.sequence_parallel or self.parallel.tp > 1,
             "needs parallel.tp > 1"),
            ("train.spike_factor", self.train.spike_factor == 0 or self.train.spike_factor > 1,
             "must be 0 (off) or > 1"),
            ("parallel.vpp", self.parallel.vpp >= 1, "must be >= 1"),
            ("parallel.vpp", self.parallel.vpp == 1 or self.parallel.pp > 1, "> 1 needs parallel.pp > 1"),
            ("optim.lr", self.optim.lr > 0, "must be > 0"),
            ("optim.min_lr_ratio", 0 <= self.optim.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("optim.warmup_steps", self.optim.warmup_steps >= 0, "must be >= 0"),
            ("optim.weight_decay", self.optim.weight_decay >= 0, "must be >= 0"),
            ("optim.beta1", 0 <= self.optim.beta1 < 1, "must be in [0, 1)"),
            ("optim.beta2", 0 <= self.optim.beta2 < 1, "must be in [0, 1)"),
            ("optim.eps", self.optim.eps > 0, "must be > 0"),
            ("optim.grad_clip", self.optim.grad_clip >= 0, "must be >= 0 (0 disables clipping)"),
            ("train.max_steps", self.train.max_steps >= 0, "must be >= 0 (0: use train.epochs)"),
            ("train.epochs", self.train.epochs > 0 or self.train.max_steps > 0, "must be > 0 when max_steps is 0"),
            ("train.pairs_per_step", self.train.pairs_per_step >= 1, "must be >= 1"),
            ("data.micro_batch_tokens", self.data.micro_batch_tokens >= 16, "must be >= 16"),
            ("data.num_workers", self.data.num_workers >= 0, "must be >= 0"),
            ("train.center_coef", self.train.center_coef >= 0, "must be >= 0"),
            ("train.eval_interval", self.train.eval_interval >= 0, "must be >= 0"),
            ("checkpoint.interval", self.checkpoint.interval >= 0, "must be >= 0"),
            ("data.max_length", self.data.max_length >= 16, "must be >= 16"),
            ("data.synthetic_train_pairs", self.data.synthetic_train_pairs >= 2, "must be >= 2"),
            ("data.synthetic_eval_pairs", self.data.synthetic_eval_pairs >= 2, "must be >= 2"),
        ]
        for key, ok, what in checks:
            if not ok:
                raise ConfigError(f"{key}={get_key(self, key)!r}: {what}")
        bad = [g for g in self.model.freeze if g not in FREEZE_GROUPS]
        if bad:
            raise ConfigError(f"model.freeze: unknown group(s) {bad}; valid groups are {list(FREEZE_GROUPS)}")
        bad = [g for g in self.model.recompute if g not in ("llm", "vision")]
        if bad:
            raise ConfigError(f"model.recompute: unknown group(s) {bad}; valid groups are ['llm', 'vision']")
        if set(self.model.freeze) == set(FREEZE_GROUPS):
            raise ConfigError("model.freeze: every group is frozen, nothing would be trained")
        if self.data.eval and not self.data.train:
            raise ConfigError("data.eval given without data.train: the synthetic set brings its own held-out split")


def all_keys(cfg: Config | None = None) -> list[str]:
    """Every dotted key ``section.name`` of the tree."""
    cfg = cfg or Config()
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))]


def get_key(cfg: Config, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


def _unknown(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert ``value`` (a YAML value or a command-line string) to the type ``hint`` of ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if len(args) < len(typing.get_args(hint)):
                return None
            raise ConfigError(f"{key}: None is not allowed")
        return _coerce(key, value, args[0])
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}={value!r}: must be one of {list(choices)}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v for v in (p.strip() for p in value.split(",")) if v] if value.strip() not in ("", "[]") else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        return [_coerce(key, v, item) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r}: expected an integer") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return int(as_float)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r}: expected a number") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return "" if value is None else str(value)
    raise ConfigError(f"{key}: unsupported field type {hint!r}")


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set dotted ``key`` to ``value`` coerced to the field's type; unknown keys raise :class:`ConfigError`."""
    if key.count(".") != 1:
        raise _unknown(key, all_keys(cfg))
    section_name, name = key.split(".")
    section = getattr(cfg, section_name, None)
    if section is None or not dataclasses.is_dataclass(section) or section_name.startswith("_"):
        raise _unknown(key, all_keys(cfg))
    hints = typing.get_type_hints(type(section))
    if name not in {f.name for f in dataclasses.fields(section)}:
        raise _unknown(key, all_keys(cfg))
    setattr(section, name, _coerce(key, value, hints[name]))


def _apply_mapping(cfg: Config, data: dict, source: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of keys")
        for name, value in values.items():
            set_key(cfg, f"{section}.{name}", value)


def parse_args(argv: list[str]) -> Config:
    """Build the config from ``argv`` (without the program name): ``[--config F.yaml] [--section.key V ...]``.

    Raises :class:`ConfigError` for unknown keys, missing values, bad values and failed validation.
    """
    config_file = None
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: expected --section.key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or (argv[i + 1].startswith("--") and not _is_number(argv[i + 1])):
                raise ConfigError(f"--{key} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if key == "config":
            config_file = value
        else:
            overrides.append((key, value))
    cfg = Config()
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"--config {config_file}: no such file")
        _apply_mapping(cfg, yaml.safe_load(path.read_text()) or {}, str(path))
    for key, value in overrides:
        set_key(cfg, key, _yaml_scalar(value))
    cfg.validate()
    return cfg


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _yaml_scalar(text: str) -> Any:
    """Command-line values are read as YAML so ``1e-5``, ``[a, b]`` and ``null`` mean what they do in the file;
    anything YAML cannot read stays a string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads "1e-5" (no dot) as a string; float() gets it right.
    if isinstance(value, str) and _is_number(value):
        return float(value)
    return text if value is None and text.lower() not in ("none", "null", "~") else value


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML; ``parse_args(["--config", path])`` rebuilds an equal config."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
