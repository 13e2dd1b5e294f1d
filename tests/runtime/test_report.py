import json
import math

from PIL import Image

from vlr_runtime.report import main, read_metrics


def _write_run(tmp_path, lines):
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_report_writes_plots_with_train_and_eval(tmp_path):
    lines = [
        json.dumps({"step": s, "loss": math.exp(-s / 5), "accuracy": 0.5 + s / 40, "margin": s / 10,
                    "tokens_per_s": 1000 + 13 * s, "lr": 1e-4, "grad_norm": 1.0})
        for s in range(1, 21)
    ]
    lines.insert(7, "{not json")
    lines.append(json.dumps({"step": 20, "split": "eval", "loss": 0.3, "accuracy": 0.9, "margin": 2.1}))
    run = _write_run(tmp_path, lines)
    train, evals, problems = read_metrics(run / "metrics.jsonl")
    assert (len(train), len(evals)) == (20, 1)
    assert problems == ["line 8: not JSON (Expecting property name enclosed in double quotes)"]
    assert main([str(run)]) == 0
    for name in ("loss", "accuracy", "margin", "throughput"):
        img = Image.open(run / "report" / f"{name}.png")
        assert img.size[0] > 300 and img.size[1] > 200
        # a plot with a drawn curve has many distinct colours; a blank canvas has one
        assert len(img.convert("RGB").getcolors(maxcolors=100000) or []) > 20


def test_report_errors_on_missing_or_empty(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1
    assert "does not exist" in capsys.readouterr().err
    _write_run(tmp_path, [json.dumps({"step": 1, "split": "eval", "accuracy": 0.5})])
    assert main([str(tmp_path)]) == 1
    assert "no training step" in capsys.readouterr().err
