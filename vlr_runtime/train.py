"""``torchrun --nproc-per-node N -m vlr_runtime.train [--config F.yaml] [--section.key V ...]``: train a reward model.

``... -m vlr_runtime.train --export-hf DIR --run.dir R [--parallel.tp T ...]``: write the latest complete checkpoint of
run ``R`` (with ``R/config.yaml`` as the base config) to ``DIR`` in the HF + ``value_head.safetensors`` format,
without training; any layout can export any checkpoint (resharding resume).

With no argument it trains the built-in tiny Qwen2.5-VL reward model on the built-in synthetic preference set
(TP=2, so run it under ``torchrun --nproc-per-node 2``); keys and defaults: :mod:`vlr_runtime.config`.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from vlr_runtime.config import ConfigError, parse_args


def _split_export(argv: list[str]) -> tuple[str | None, list[str]]:
    """``(DIR of --export-hf DIR or None, the other arguments)``; with an export, ``R/config.yaml`` of ``--run.dir R``
    becomes the base config unless ``--config`` is given."""
    if "--export-hf" not in argv:
        return None, argv
    i = argv.index("--export-hf")
    if i + 1 >= len(argv):
        raise ConfigError("--export-hf needs a directory")
    out, rest = argv[i + 1], argv[:i] + argv[i + 2:]
    if "--run.dir" not in rest:
        raise ConfigError("--export-hf needs --run.dir R (the run whose latest checkpoint is exported)")
    saved = Path(rest[rest.index("--run.dir") + 1]) / "config.yaml"
    if "--config" not in rest and saved.is_file():
        rest = ["--config", str(saved), *rest]
    return out, rest


def main(argv: list[str] | None = None) -> int:
    try:
        export_dir, argv = _split_export(sys.argv[1:] if argv is None else argv)
        cfg = parse_args(argv)
    except ConfigError as err:
        print(f"vlr_runtime.train: config error: {err}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    # megatron-core announces at import that Transformer Engine / Apex / FSDP extras are absent and suggests CUDA
    # settings; none of it is actionable for this runtime, and it buries the run's own output.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    # Imported after the config is checked so that a typo fails in a fraction of a second.
    from vlr_runtime.parallel import teardown
    from vlr_runtime.training import Trainer

    try:
        trainer = Trainer(cfg)
        if export_dir is None:
            trainer.train()
        else:
            if trainer.step == 0:
                raise ConfigError(f"--export-hf: no complete checkpoint under {trainer.run_dir / 'checkpoints'}")
            from vlr_runtime.checkpoint.hf import export_hf_checkpoint

            trainer.loader.close()
            export_hf_checkpoint(trainer.model, trainer.args, export_dir, source_dir=trainer.model_dir)
            trainer.metrics.message(f"exported step {trainer.step} of {trainer.run_dir} to {export_dir}")
            trainer.metrics.close()
    except ConfigError as err:
        print(f"vlr_runtime.train: config error: {err}", file=sys.stderr)
        return 2
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
