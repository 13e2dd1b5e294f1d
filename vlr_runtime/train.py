"""``torchrun --nproc-per-node N -m vlr_runtime.train [--config F.yaml] [--section.key V ...]``: train a reward model.

With no argument it trains the built-in tiny Qwen2.5-VL reward model on the built-in synthetic preference set
(TP=2, so run it under ``torchrun --nproc-per-node 2``); keys and defaults: :mod:`vlr_runtime.config`.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from vlr_runtime.config import ConfigError, parse_args


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
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
        Trainer(cfg).train()
    except ConfigError as err:
        print(f"vlr_runtime.train: config error: {err}", file=sys.stderr)
        return 2
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
