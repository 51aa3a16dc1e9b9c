"""`msae import`: a SAELens folder into a run folder; an exported SAE imported back gives the same
latents, reconstruction and eval numbers; broken folders are refused in one line."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures_runs import make_run, make_store
from msae_core import cli
from msae_core.errors import MsaeError
from msae_core.evals import open_run, run_evals
from msae_core.sae import SAEConfig, build_sae
from msae_core.sae_io import export_saelens, import_saelens, load_sae
from msae_core.training.imports import import_run


def _trained(arch: str, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    kw = {"k": 4} if arch in ("topk", "batchtopk", "matryoshka") else {}
    sae = build_sae(SAEConfig(arch=arch, d_in=d, d_sae=48, **kw))
    x = 7.0 * torch.randn(256, d, generator=g) + 3.0  # raw activations far from unit scale
    sae.fit_input_scale_(x)
    with torch.no_grad():  # weights away from their tied initialisation
        for p in (sae.W_enc, sae.W_dec, sae.b_enc):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        if arch == "batchtopk":
            sae.threshold.fill_(0.2)
    return sae.eval(), x


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu", "batchtopk"])
def test_export_then_import_gives_the_same_sae(arch, tmp_path):
    sae, x = _trained(arch)
    export_saelens(sae, tmp_path / "sl", model_name="m", hook_name="blocks.2.hook_resid_post")
    back, cfg = import_saelens(tmp_path / "sl")
    assert back.cfg.arch == {"batchtopk": "jumprelu"}.get(arch, arch)
    with torch.no_grad():
        a, b = sae.forward(x), back.forward(x)
    torch.testing.assert_close(b.x_hat, a.x_hat, rtol=1e-4, atol=1e-4)
    # latents in input units (the decoder norm folded in) agree: same firing, same contributions
    s = sae.input_scale
    torch.testing.assert_close(b.f * back.W_dec.norm(dim=1), a.f * (sae.W_dec / s).norm(dim=1), rtol=1e-4, atol=1e-4)


def test_import_run_is_evaluated_to_the_same_numbers(tmp_path):
    from fixtures_runs import TEXT

    store = make_store(tmp_path / "stores" / "s")
    corpus = tmp_path / "corpus.txt"  # the evals' text: the store's corpus, as a local file
    corpus.write_text("\n\n".join([TEXT] * 40))
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**manifest, "corpus": {"name": str(corpus)}}))
    run = make_run(tmp_path, "orig", str(store), arch="topk", d_sae=64, ev=None, traces=False, umap=False, k=8)
    sae = load_sae(run)
    export_saelens(sae, tmp_path / "sl", model_name="ignored", hook_name="blocks.0.hook_resid_post")
    assert cli.main(["import", str(tmp_path / "sl"), "--out", str(tmp_path / "runs" / "back"),
                     "--acts", str(store)]) == 0
    back = tmp_path / "runs" / "back"
    settings = {"core": {"n_eval_reconstruction_batches": 1, "n_eval_sparsity_variance_batches": 1,
                         "batch_size_prompts": 2}}
    a = run_evals(run, "core", progress=False, overrides=settings)["core"]["eval_result_metrics"]
    b = run_evals(back, "core", progress=False, overrides=settings)["core"]["eval_result_metrics"]
    for group in ("reconstruction_quality", "sparsity", "model_behavior_preservation"):
        for key, v in a[group].items():
            assert b[group][key] == pytest.approx(v, rel=1e-4, abs=1e-5), (group, key)
    ctx = open_run(back, progress=False)
    assert ctx.layer == 0 and json.loads((back / "status.json").read_text())["state"] == "done"


def test_import_without_a_store_streams_the_cfg_model_and_layer(tmp_path):
    sae, _ = _trained("topk")
    export_saelens(sae, tmp_path / "sl", model_name="google/gemma-3-270m", hook_name="blocks.5.hook_resid_post",
                   context_size=64)
    out = import_run(tmp_path / "sl", tmp_path / "run")
    cfg = json.loads((out / "config.json").read_text())["data"]
    assert (cfg["source"], cfg["model"], cfg["layer"], cfg["context_size"]) == ("stream", "google/gemma-3-270m", 5, 64)
    out2 = import_run(tmp_path / "sl", tmp_path / "run2", model="embedded", layer=6)
    assert json.loads((out2 / "config.json").read_text())["data"]["model"] == "embedded"


def test_broken_folders_are_refused_in_one_line(tmp_path, capsys):
    sae, _ = _trained("topk")
    sl = tmp_path / "sl"
    export_saelens(sae, sl, model_name="m", hook_name="blocks.2.hook_resid_post")
    assert cli.main(["import", str(tmp_path / "nothing"), "--out", str(tmp_path / "r0")]) == 2
    assert "cfg.json and sae_weights.safetensors missing" in capsys.readouterr().err
    cfg = json.loads((sl / "cfg.json").read_text())
    (sl / "cfg.json").write_text(json.dumps({**cfg, "d_sae": "many", "architecture": "gated", "k": None}))
    with pytest.raises(MsaeError, match="architecture 'gated'.*d_sae is missing or not a positive integer"):
        import_saelens(sl)
    (sl / "cfg.json").write_text(json.dumps(cfg))
    w = load_file(str(sl / "sae_weights.safetensors"))
    save_file({**w, "W_dec": w["W_dec"][:10]}, str(sl / "sae_weights.safetensors"))
    with pytest.raises(MsaeError, match=r"W_dec has shape \(10, 16\), cfg says \(48, 16\)"):
        import_saelens(sl)
    save_file(w, str(sl / "sae_weights.safetensors"))
    (sl / "cfg.json").write_text(json.dumps({**cfg, "hook_name": "blocks.2.attn.hook_z", "metadata": {}}))
    assert cli.main(["import", str(sl), "--out", str(tmp_path / "r1")]) == 2
    assert "blocks.L.hook_resid_post" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert cli.main(["import", str(sl), "--out", str(tmp_path / "full"), "--layer", "2"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli.main(["import", "--release", "gemma-scope-2", "--sae-id", "x", "--out", str(tmp_path / "r2")]) == 2
    assert "sae-lens" in capsys.readouterr().err


def test_release_import_goes_through_sae_lens_and_records_the_release(tmp_path, monkeypatch, capsys):
    """The --release path with a stand-in for sae-lens (no hub here): msae asks it for the release's
    SAE, has it saved in SAELens's format, and imports that; sae-lens's own errors become one line.
    The real hub path is not exercised by the tests."""
    import sys
    import types

    sae, x = _trained("topk")
    asked = []

    class StandIn:  # what sae-lens 6 returns: an SAE object with save_model(path)
        @classmethod
        def from_pretrained(cls, release, sae_id, device="cpu"):
            asked.append((release, sae_id, device))
            if sae_id == "missing":
                raise ValueError("ID missing not found in release gemma-scope-2-270m\nmore detail")
            return cls()

        def save_model(self, path):
            export_saelens(sae, path, model_name="google/gemma-3-270m", hook_name="blocks.6.hook_resid_post")

    monkeypatch.setitem(sys.modules, "sae_lens", types.SimpleNamespace(SAE=StandIn))
    out = tmp_path / "runs" / "gs"
    assert cli.main(["import", "--release", "gemma-scope-2-270m", "--sae-id", "layer_6/width_16k",
                     "--out", str(out)]) == 0
    assert asked == [("gemma-scope-2-270m", "layer_6/width_16k", "cpu")]
    status = json.loads((out / "status.json").read_text())
    assert status["imported_from"] == "gemma-scope-2-270m / layer_6/width_16k"  # not the deleted temp folder
    assert json.loads((out / "config.json").read_text())["data"]["layer"] == 6
    with torch.no_grad():
        torch.testing.assert_close(load_sae(out).forward(x).x_hat, sae.forward(x).x_hat, rtol=1e-4, atol=1e-4)
    capsys.readouterr()
    assert cli.main(["import", "--release", "gemma-scope-2-270m", "--sae-id", "missing",
                     "--out", str(tmp_path / "runs" / "gs2")]) == 2
    err = capsys.readouterr().err
    assert "cannot fetch gemma-scope-2-270m / missing: ID missing not found" in err and "more detail" not in err
