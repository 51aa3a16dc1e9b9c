"""Sweeps: grid expansion over any field, a 2x2 sweep in parallel processes, and its resume."""

import json
import os

import pytest
import torch

from msae_core import cli
from msae_core.artifacts import SAE_WEIGHTS
from msae_core.errors import MsaeError
from msae_core.runs.config import DataConfig, RunConfig, TrainConfig
from msae_core.runs.folder import list_runs, read_status, write_status
from msae_core.sae import SAEConfig
from msae_core.data.store import StoreSettings, StoreWriter
from msae_core.runs.sweep import expand_grid, parse_grid, sweep_dir

D = 64


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("acts") / "store"
    g = torch.Generator().manual_seed(0)
    n = 1024
    w = StoreWriter(path, StoreSettings(model="tiny", layer=0, target_tokens=n, dtype="float32",
                                        context_size=8), {"d_model": D, "tokenizer": "tiny", "bos_token_id": 1})
    w.write_shard(torch.randn(n, D, generator=g), torch.zeros(n, dtype=torch.int32),
                  torch.arange(n // 8).repeat_interleave(8), torch.arange(8).repeat(n // 8),
                  torch.zeros(n // 8, 8, dtype=torch.int32), torch.arange(n // 8), torch.arange(n // 8))
    w.finish()
    return path


def base_config(store):
    return RunConfig(sae=SAEConfig(arch="momentum", base="topk", d_in=D, d_sae=128, k=8),
                     train=TrainConfig(steps=20, batch_size=64, warmup_steps=5, device="cpu", log_every=10,
                                       checkpoint_every=10, snapshot_every=10),
                     data=DataConfig(acts=str(store)))


def test_expand_grid_types_names_and_refusals(store):
    base = base_config(store)
    pts = expand_grid(base, {"beta": "0.9,0.95", "sae.tau": [0.3, 0.5], "train.lr": ["1e-3"]}, "s")
    assert len(pts) == 4
    assert [p.name for p in pts] == ["s-beta0.9-tau0.3-lr0.001", "s-beta0.9-tau0.5-lr0.001",
                                     "s-beta0.95-tau0.3-lr0.001", "s-beta0.95-tau0.5-lr0.001"]
    assert pts[3].config.sae.momentum.beta == 0.95 and pts[3].config.sae.momentum.tau == 0.5 and pts[3].config.train.lr == 1e-3
    assert pts[3].values == {"sae.momentum.beta": 0.95, "sae.momentum.tau": 0.5, "train.lr": 0.001}
    assert base.sae.momentum.beta != 0.95 or base.sae.momentum.tau != 0.5  # base untouched
    assert parse_grid(["beta=0.9,0.95", "lam=0"]) == {"beta": ["0.9", "0.95"], "lam": ["0"]}
    with pytest.raises(MsaeError, match="sae.seed or train.seed"):
        expand_grid(base, {"seed": [1, 2]})
    reps = expand_grid(base, {"lam": "0.1", "seeds": "0,1,2"}, "r")  # the replicate axis sets both seeds
    assert [p.name for p in reps] == ["r-lam0.1-seed0", "r-lam0.1-seed1", "r-lam0.1-seed2"]
    assert [(p.config.sae.seed, p.config.train.seed) for p in reps] == [(0, 0), (1, 1), (2, 2)]
    assert reps[1].values == {"sae.momentum.lam": 0.1, "seeds": 1}
    from msae_core.inspect.groups import group_key

    keys = {group_key(p.config.to_dict(), "same-data") for p in reps}
    assert len(keys) == 1 and group_key(expand_grid(base, {"lam": "0.3"}, "r")[0].config.to_dict(), "same-data") not in keys
    with pytest.raises(MsaeError, match="not a field"):
        expand_grid(base, {"betta": [1]})
    with pytest.raises(MsaeError, match="not a valid"):
        expand_grid(base, {"beta": "high"})
    with pytest.raises(MsaeError) as exc:  # every bad point named at once
        expand_grid(base, {"beta": "1.5,0.9", "tau": "2"})
    assert "beta" in str(exc.value) and "tau" in str(exc.value)
    with pytest.raises(MsaeError, match="name=v1,v2"):
        parse_grid(["beta"])
    from msae_core.runs.sweep import default_name  # the README's example gives no --name

    assert default_name(parse_grid(["lam=0,0.1,0.3", "sae.tau=0.3,0.5"])) == "sweep-lam-tau"


@pytest.mark.slow  # five `msae train` processes, ~5 s each of torch start-up on 2 cores
def test_sweep_2x2_parallel_then_resume(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base_path = tmp_path / "base.json"
    base_config(store).save(base_path)
    argv = ["sweep", "--base-config", str(base_path), "--grid", "beta=0.9,0.95", "lam=0,0.1",
            "--root", "runs", "--name", "sw", "--parallel", "2"]
    assert cli.main(argv) == 0
    runs = {r.name: r for r in list_runs(tmp_path / "runs")}
    assert sorted(runs) == ["sw-beta0.9-lam0", "sw-beta0.9-lam0.1", "sw-beta0.95-lam0", "sw-beta0.95-lam0.1"]
    assert all(r.state == "done" and r.problem is None and r.has_weights for r in runs.values())
    assert runs["sw-beta0.95-lam0.1"].config["sae"]["momentum"]["lam"] == 0.1
    record = json.loads((sweep_dir(tmp_path / "runs", "sw") / "sweep.json").read_text())
    assert [p["state"] for p in record["points"]] == ["done"] * 4
    assert record["points"][1]["values"] == {"sae.momentum.beta": 0.9, "sae.momentum.lam": 0.1}
    # the four points share the store: one pass, one process, one log each run's train.log shows
    assert [p["group"] for p in record["points"]] == [0] * 4
    assert len({read_status(r.path)["pid"] for r in runs.values()}) == 1
    group_log = sweep_dir(tmp_path / "runs", "sw") / "group-0.log"
    assert all((r.path / "train.log").resolve() == group_log.resolve() for r in runs.values())

    # break one point (as if killed after its checkpoint), note the others' weights
    broken = tmp_path / "runs" / "sw-beta0.9-lam0.1"
    (broken / SAE_WEIGHTS).unlink()
    write_status(broken, state="running", pid=2 ** 22 + 4242)
    mtimes = {n: os.stat(tmp_path / "runs" / n / SAE_WEIGHTS).st_mtime_ns
              for n in runs if n != broken.name}
    assert cli.main(argv[:-2]) == 0  # serial this time
    assert read_status(broken)["state"] == "done" and (broken / SAE_WEIGHTS).exists()
    assert {n: os.stat(tmp_path / "runs" / n / SAE_WEIGHTS).st_mtime_ns for n in mtimes} == mtimes


def test_points_spread_over_the_gpus():
    """On a machine with several GPUs the points on `auto` go round-robin over them (the runs a
    sweep has going at once then train on different GPUs); a device set by hand is kept; one GPU
    or none changes nothing."""
    from msae_core.runs.sweep import spread_over_gpus

    cfgs = [RunConfig(train=TrainConfig(device=d)) for d in ("auto", "auto", "cpu", "auto", "auto")]
    got = [c.train.device for c in spread_over_gpus(cfgs, 2)]
    assert got == ["cuda:0", "cuda:1", "cpu", "cuda:1", "cuda:0"]
    assert [c.train.device for c in spread_over_gpus(cfgs, 1)] == ["auto", "auto", "cpu", "auto", "auto"]
    assert [c.train.device for c in cfgs] == ["auto", "auto", "cpu", "auto", "auto"]  # not changed in place
