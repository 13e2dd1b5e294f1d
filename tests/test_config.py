"""The config tree: defaults == configs/tiny.yaml, YAML + dotted overrides, coercion, clear errors, dump round trip."""

import subprocess
import sys
from pathlib import Path

import pytest

from vlr_runtime.config import Config, ConfigError, dump_config, parse_args, to_dict

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_tiny_config():
    assert to_dict(parse_args(["--config", str(REPO / "configs/tiny.yaml")])) == to_dict(Config())


@pytest.mark.parametrize("name", ["tiny", "qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen2_5_vl_7b_stage2", "qwen2_5_vl_72b"])
def test_shipped_configs_parse(name):
    parse_args(["--config", str(REPO / f"configs/{name}.yaml")])


def test_7b_config_is_the_paper_recipe():
    """ViT frozen, merger + LLM + head trained, lr 1e-5 then 1e-6, 2 epochs per stage, stage 2 adds text pairs and
    starts from stage 1's export."""
    stage1 = parse_args(["--config", str(REPO / "configs/qwen2_5_vl_7b.yaml")])
    stage2 = parse_args(["--config", str(REPO / "configs/qwen2_5_vl_7b_stage2.yaml")])
    for cfg in (stage1, stage2):
        assert cfg.model.freeze == ["vision"] and cfg.train.epochs == 2 and cfg.model.dtype == "bfloat16"
    assert stage1.optim.lr == 1e-5 and stage2.optim.lr == 1e-6
    assert set(stage1.data.train) < set(stage2.data.train)
    assert any("text" in f for f in set(stage2.data.train) - set(stage1.data.train))
    assert stage2.model.path == stage1.run.dir + "/export"


def test_overrides_are_coerced():
    cfg = parse_args([
        "--optim.lr", "1e-5", "--train.max_steps=7", "--parallel.tp", "1", "--log.progress", "false",
        "--data.train", "a.jsonl,b.jsonl", "--model.freeze", "[vision, merger]", "--train.epochs", "2",
        "--optim.beta1", "0", "--run.dir", "runs/x",
    ])
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.parallel.tp == 1 and cfg.log.progress is False
    assert cfg.data.train == ["a.jsonl", "b.jsonl"] and cfg.model.freeze == ["vision", "merger"]
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float) and cfg.optim.beta1 == 0.0
    assert cfg.run.dir == "runs/x"


def test_override_beats_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim: {lr: 0.5}\ntrain: {seed: 3}\n")
    cfg = parse_args(["--config", str(f), "--optim.lr", "0.25"])
    assert cfg.optim.lr == 0.25 and cfg.train.seed == 3


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--optim.lrr", "1e-5"], "'optim.lrr'; did you mean 'optim.lr'"),
        (["--optimm.lr", "1e-5"], "'optimm.lr'; did you mean 'optim.lr'"),
        (["--lr", "1e-5"], "unknown config key 'lr'"),
        (["--train.max_steps", "ten"], "train.max_steps='ten': expected an integer"),
        (["--train.max_steps", "1.5"], "expected an integer"),
        (["--log.progress", "maybe"], "expected true or false"),
        (["--model.dtype", "float16"], "must be one of"),
        (["--optim.lr", "-1"], "optim.lr=-1.0: must be > 0"),
        (["--model.freeze", "vision,eyes"], "unknown group(s) ['eyes']"),
        (["--model.freeze", "vision,merger,llm,head"], "nothing would be trained"),
        (["--train.seed"], "--train.seed needs a value"),
        (["train.seed", "1"], "unexpected argument"),
        (["--config", "/nonexistent.yaml"], "no such file"),
    ],
)
def test_bad_input_names_the_key(argv, needle):
    with pytest.raises(ConfigError) as err:
        parse_args(argv)
    assert needle in str(err.value)


def test_bad_key_in_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train: {max_step: 3}\n")
    with pytest.raises(ConfigError, match="'train.max_step'; did you mean 'train.max_steps'"):
        parse_args(["--config", str(f)])


def test_dump_round_trip(tmp_path):
    cfg = parse_args(["--optim.lr", "3e-4", "--data.train", "x.jsonl", "--model.freeze", "vision"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert to_dict(parse_args(["--config", str(tmp_path / "config.yaml")])) == to_dict(cfg)


def test_typo_fails_at_startup_from_the_command_line(tmp_path):
    """The entry point itself rejects the typo before any process group, model or data work."""
    proc = subprocess.run(
        [sys.executable, "-m", "vlr_runtime.train", "--optim.lrr", "1e-5", "--run.dir", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 2
    assert "optim.lrr" in proc.stderr and "did you mean 'optim.lr'" in proc.stderr
    assert not (tmp_path / "r").exists()
