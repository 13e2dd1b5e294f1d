"""Config keys of the parallel layout: virtual pipeline stages need pipeline stages; checkpoints combine with the
distributed optimizer."""

from __future__ import annotations

import pytest

from vlr_runtime.config import ConfigError, parse_args


@pytest.mark.parametrize("argv, message", [
    (["--parallel.vpp", "2"], r"parallel.vpp=2: > 1 needs parallel.pp > 1"),
    (["--parallel.pp", "2", "--parallel.vpp", "0"], r"parallel.vpp=0: must be >= 1"),
])
def test_bad_virtual_pipeline_settings_are_config_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_virtual_stages_and_distributed_optimizer_checkpoints_are_accepted():
    cfg = parse_args(["--parallel.pp", "2", "--parallel.vpp", "2", "--parallel.distributed_optimizer", "true",
                      "--checkpoint.interval", "10"])
    assert (cfg.parallel.vpp, cfg.parallel.distributed_optimizer, cfg.checkpoint.interval) == (2, True, 10)
