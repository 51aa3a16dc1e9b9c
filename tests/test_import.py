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
from msae_core.runs.saelens import import_run


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


def test_import_without_a_store_streams_the_cfg_model_and_layer(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub name that cannot be read here is imported unchecked
    sae, _ = _trained("topk")
    export_saelens(sae, tmp_path / "sl", model_name="google/gemma-3-270m", hook_name="blocks.5.hook_resid_post",
                   context_size=64)
    out = import_run(tmp_path / "sl", tmp_path / "run")
    cfg = json.loads((out / "config.json").read_text())["data"]
    assert (cfg["source"], cfg["model"], cfg["layer"], cfg["context_size"]) == ("stream", "google/gemma-3-270m", 5, 64)
    assert "were not checked" in caplog.text


def _tiny_lm_sae(tmp_path, d_in: int):
    """A tiny random model folder (2 blocks of width 64) and a SAELens SAE of width `d_in` for it."""
    from msae_core.data.lm import save_tiny_model

    lm = tmp_path / "tiny-lm"
    save_tiny_model(lm, family="llama", d_model=64, n_layers=2)
    sae = build_sae(SAEConfig(arch="topk", d_in=d_in, d_sae=32, k=4))
    export_saelens(sae, tmp_path / f"sl{d_in}", model_name=str(lm), hook_name="blocks.1.hook_resid_post")
    return lm, tmp_path / f"sl{d_in}"


def test_import_checks_the_model_layer_width_and_corpus(tmp_path, capsys, monkeypatch):
    from msae_core.data.lm import hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    lm, sl = _tiny_lm_sae(tmp_path, 64)
    (tmp_path / "c.txt").write_text("some text.\n\nmore text.")
    out = import_run(sl, tmp_path / "ok", corpus=str(tmp_path / "c.txt"))
    assert json.loads((out / "config.json").read_text())["data"]["layer"] == 1
    cases = {"past the last block of": ["--layer", "2"], "layer must be >= 0": ["--layer", "-1"],
             "cannot load": ["--model", str(tmp_path / "no-such-model")],
             "corpus file": ["--corpus", str(tmp_path / "c.docx")],
             "no network": ["--corpus", "no-such-dataset-name"]}
    (tmp_path / "c.docx").write_text("x")
    _, wide = _tiny_lm_sae(tmp_path, 48)
    capsys.readouterr()  # the tiny model's own writing
    for i, (said, extra) in enumerate(cases.items()):
        dest = tmp_path / f"bad{i}"
        assert cli.main(["import", str(sl), "--out", str(dest)] + extra) == 2, said
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err
        assert not dest.exists()  # nothing half-written
    assert cli.main(["import", str(wide), "--out", str(tmp_path / "w")]) == 2
    assert "width 48" in capsys.readouterr().err


@pytest.mark.parametrize("change, said", [
    ("nan", "W_enc holds 3 NaN or infinite values"),
    ("inf", "W_dec holds 1 NaN or infinite values"),
    ("k_big", "k 49 is more than d_sae 48"),
    ("k_bool", "needs k, a positive integer"),
    ("threshold", "2 JumpReLU thresholds are negative")])
def test_import_refuses_weights_and_settings_that_cannot_work(tmp_path, capsys, change, said):
    sae, _ = _trained("jumprelu" if change == "threshold" else "topk")
    sl = tmp_path / "sl"
    export_saelens(sae, sl, model_name="m", hook_name="blocks.2.hook_resid_post")
    w, cfg = load_file(str(sl / "sae_weights.safetensors")), json.loads((sl / "cfg.json").read_text())
    if change == "nan":
        w["W_enc"][0, :3] = float("nan")
    elif change == "inf":
        w["W_dec"][5, 1] = float("inf")
    elif change == "threshold":
        w["threshold"][:2] = -0.5
    else:
        cfg["k"] = 49 if change == "k_big" else True
    save_file(w, str(sl / "sae_weights.safetensors"))
    (sl / "cfg.json").write_text(json.dumps(cfg))
    assert cli.main(["import", str(sl), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


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
    err = capsys.readouterr().err
    try:  # without the [bench] extra: what to install; with it, sae-lens's own word on the release
        import sae_lens  # noqa: F401
    except ImportError:
        assert "sae-lens" in err and len(err.strip().splitlines()) == 1
    else:
        assert "cannot fetch gemma-scope-2 / x: Release gemma-scope-2 not found" in err


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


def _serve_hub(files: dict[str, bytes], seen: list[str]):
    """A local HTTP server answering as the Hugging Face hub's file endpoint does
    (/{repo}/resolve/{revision}/{path}: HEAD with the commit, etag and size headers, GET with byte
    ranges, 404 with X-Error-Code EntryNotFound for any other file). Returns (server, url)."""
    import hashlib
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    commit = hashlib.sha1(b"".join(files.values())).hexdigest()

    class Hub(BaseHTTPRequestHandler):
        def _answer(self, body: bool) -> None:
            seen.append(f"{self.command} {self.path}")
            key = self.path.split("?")[0]
            parts = key.lstrip("/").split("/resolve/", 1)
            data = files.get(parts[0] + "/" + parts[1].split("/", 1)[1]) if len(parts) == 2 else None
            if data is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            lo, hi = 0, len(data) - 1
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                a, _, b = rng[6:].partition("-")
                lo, hi = int(a or 0), min(int(b) if b else len(data) - 1, len(data) - 1)
            chunk = data[lo:hi + 1]
            self.send_response(206 if rng else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
            self.send_header("Content-Length", str(len(chunk)))
            if rng:
                self.send_header("Content-Range", f"bytes {lo}-{hi}/{len(data)}")
            self.end_headers()
            if body:
                self.wfile.write(chunk)

        def do_HEAD(self):  # noqa: N802 - http.server's names
            self._answer(False)

        def do_GET(self):  # noqa: N802
            self._answer(True)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_release_import_through_sae_lens_and_a_hub(tmp_path):
    """`msae import --release` with the real sae-lens (the [bench] extra) against a local server
    that answers as the hub does, holding a Gemma Scope 2 SAE for Gemma 3 270M (SAELens's release
    gemma-scope-2-270m-pt-res, random weights of the real layout): sae-lens resolves the release,
    reads the tensor shapes by byte range, downloads, converts; msae imports what it saved."""
    import os
    import subprocess
    import sys

    pytest.importorskip("sae_lens", reason="the [bench] extra (sae-lens) is not installed")
    g = torch.Generator().manual_seed(0)
    d_in, d_sae = 640, 96
    params = {"w_enc": torch.randn(d_in, d_sae, generator=g) / 25, "w_dec": torch.randn(d_sae, d_in, generator=g) / 25,
              "b_enc": torch.randn(d_sae, generator=g) / 10, "b_dec": torch.randn(d_in, generator=g) / 10,
              "threshold": torch.rand(d_sae, generator=g) / 5}
    save_file(params, tmp_path / "params.safetensors")
    folder = "google/gemma-scope-2-270m-pt/resid_post/layer_12_width_16k_l0_small"
    files = {f"{folder}/params.safetensors": (tmp_path / "params.safetensors").read_bytes(),
             f"{folder}/config.json": json.dumps({"architecture": "jump_relu", "model_name": "gemma-v3-270m-pt",
                                                  "hf_hook_point_in": "model.layers.12.output"}).encode()}
    seen: list[str] = []
    server, url = _serve_hub(files, seen)
    try:
        env = {**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):  # set on offline machines
            env.pop(var, None)
        out = tmp_path / "runs" / "gs2"
        cmd = [sys.executable, "-m", "msae_core.cli", "import", "--release", "gemma-scope-2-270m-pt-res",
               "--sae-id", "layer_12_width_16k_l0_small"]
        proc = subprocess.run(cmd + ["--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
        offline = subprocess.run(cmd + ["--out", str(tmp_path / "runs" / "gs2-embedded"), "--model", "embedded"],
                                 env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
    assert offline.returncode == 0, offline.stderr[-2000:]
    assert "--model embedded" not in offline.stdout
    assert json.loads((tmp_path / "runs" / "gs2-embedded" / "config.json").read_text())["data"]["model"] == "embedded"
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(s.startswith("GET") and s.endswith("/params.safetensors") for s in seen)  # fetched from the hub
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "done"
    assert status["imported_from"] == "gemma-scope-2-270m-pt-res / layer_12_width_16k_l0_small"
    data = json.loads((out / "config.json").read_text())["data"]
    assert (data["model"], data["layer"]) == ("google/gemma-3-270m", 12)  # the embedded model's HF name
    assert "import again with --model embedded" in proc.stdout
    sae = load_sae(out)
    assert (sae.cfg.arch, sae.cfg.d_in, sae.cfg.d_sae) == ("jumprelu", d_in, d_sae)
    x = torch.randn(32, d_in, generator=g)
    pre = x @ params["w_enc"] + params["b_enc"]
    f = torch.where(pre > params["threshold"], pre, torch.zeros_like(pre))  # Gemma Scope's JumpReLU
    with torch.no_grad():
        got = sae.forward(x)
    torch.testing.assert_close(got.x_hat, f @ params["w_dec"] + params["b_dec"], rtol=1e-4, atol=1e-4)


def test_export_command_round_trips_through_import(tmp_path, capsys):
    """`msae export RUN --format saelens` and `msae import` give back the same SAE and settings."""
    from fixtures_runs import make_run

    store = make_store(tmp_path / "stores" / "s")
    run = make_run(tmp_path, "orig", str(store), arch="momentum", d_sae=64, ev=None, traces=False, umap=False,
                   base="topk", k=8)
    out = tmp_path / "exports" / "orig-saelens"
    assert cli.main(["export", str(run), "--format", "saelens", "--out", str(out)]) == 0
    cfg = json.loads((out / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["k"], cfg["metadata"]["hook_name"]) == ("topk", 8, "blocks.0.hook_resid_post")
    assert cli.main(["import", str(out), "--out", str(tmp_path / "runs" / "back"), "--acts", str(store)]) == 0
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(load_sae(tmp_path / "runs" / "back").forward(x).x_hat,
                                   load_sae(run).forward(x).x_hat, rtol=1e-4, atol=1e-4)
    capsys.readouterr()
    assert cli.main(["export", str(run), "--out", str(out)]) == 2  # not over an export
    assert "exists and is not empty" in capsys.readouterr().err
    pending = make_run(tmp_path, "pending", str(store), arch="topk", state="running", ev=None, traces=False,
                       umap=False, k=8)
    assert cli.main(["export", str(pending), "--out", str(tmp_path / "p")]) == 2
    assert "no final weights" in capsys.readouterr().err and not (tmp_path / "p").exists()
