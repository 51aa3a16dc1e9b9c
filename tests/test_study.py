"""`msae study log`: the research log's six settings as one sweep with training seeds, every run
evaluated, and a table of ours beside the log's reported numbers with its suspicious values marked."""

import json

from fixtures_runs import TEXT, make_store
from msae_core import cli


def test_study_log_trains_every_setting_and_seed_and_writes_the_table(tmp_path, capsys):
    store = make_store(tmp_path / "stores" / "s")
    corpus = tmp_path / "corpus.txt"  # the core eval's text: the store's corpus, as a local file
    corpus.write_text("\n\n".join([TEXT] * 40))
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**manifest, "corpus": {"name": str(corpus)}}))
    argv = ["study", "log", "--acts", str(store), "--root", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
            "--seeds", "0,1", "--only", "run1,run5", "--evals", "core", "--d-sae", "64", "--k", "4",
            "--steps", "8", "--batch-size", "64", "--no-progress",
            "--set", "core.n_eval_reconstruction_batches=1", "--set", "core.n_eval_sparsity_variance_batches=1",
            "--set", "core.batch_size_prompts=2", "--set", "core.density_tokens=64"]
    assert cli.main(argv) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == [f"study-log-{s}-seed{n}" for s in ("baseline", "run1", "run5") for n in (0, 1)]
    cfg = json.loads((tmp_path / "runs" / "study-log-run5-seed1" / "config.json").read_text())
    assert (cfg["sae"]["momentum"]["beta"], cfg["sae"]["momentum"]["tau"], cfg["sae"]["momentum"]["lam"], cfg["sae"]["seed"], cfg["train"]["seed"]) == \
        (0.95, 0.4, 0.3, 1, 1)
    md = (tmp_path / "out" / "study.md").read_text()
    assert "| log baseline | - | - | - | 2 |" in md and "| log run 5 |" in md and "| log run 3 |" not in md
    assert "8896" in md and "not a sparse code" in md  # the log's value beside ours, marked
    assert "one seed" not in md and ("within noise" in md or "resolved" in md)  # two seeds: paired
    mtimes = {r: (tmp_path / "runs" / r / "sae.safetensors").stat().st_mtime_ns for r in runs}
    assert cli.main(argv) == 0  # again: everything found done
    assert {r: (tmp_path / "runs" / r / "sae.safetensors").stat().st_mtime_ns for r in runs} == mtimes
    capsys.readouterr()
    assert cli.main(["study", "log", "--acts", str(store), "--out", str(tmp_path / "o2"), "--only", "run9"]) == 2
    assert "unknown setting(s) run9" in capsys.readouterr().err
