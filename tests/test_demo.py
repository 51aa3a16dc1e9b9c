"""`msae demo`, the README's main job, end to end on a tiny random model (the embedded model's
parts are tested in test_lm, test_harvest and the evals' embedded tests)."""

from __future__ import annotations

import json

import pytest

from msae_core import cli, demo
from msae_core.lm import save_tiny_model


@pytest.mark.slow
def test_demo_harvests_trains_and_evaluates_then_skips_what_is_done(tmp_path, capsys):
    model = tmp_path / "tiny"
    save_tiny_model(model, family="llama", d_model=32, n_layers=2)
    root = tmp_path / "results"
    argv = ["demo", "--root", str(root), "--model", str(model), "--layer", "1", "--tokens", "3000",
            "--steps", "30", "--d-sae", "64", "--batch-size", "128", "--evals", "core"]
    assert cli.main(argv) == 0
    assert demo.demo_state(root) == {name: "done" for name in demo.DEMO_RUNS}
    for name in demo.DEMO_RUNS:
        ev = json.loads((root / "runs" / name / "eval.json").read_text())
        assert set(ev) == {"core"}
        assert ev["core"]["eval_result_metrics"]["sparsity"]["l0"] > 0
    cfg = json.loads((root / "runs" / "demo-momentum" / "config.json").read_text())
    assert cfg["sae"]["arch"] == "momentum" and cfg["sae"]["lam"] == 0.3
    # a second call finds everything done: the weights are not retrained
    mtime = (root / "runs" / "demo-topk" / "sae.safetensors").stat().st_mtime_ns
    assert cli.main(argv) == 0
    assert (root / "runs" / "demo-topk" / "sae.safetensors").stat().st_mtime_ns == mtime


def test_demo_refuses_bad_sizes(tmp_path, capsys):
    assert cli.main(["demo", "--root", str(tmp_path), "--steps", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err
