"""Streaming activations from a tiny model: the harvested rows, deterministic batches, an exact
resume, and `msae train --source stream`."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from msae_core import cli
from msae_core.data.harvest import harvest
from msae_core.data.loader import BatchLoader
from msae_core.data.store import StoreSettings
from msae_core.data.stream import ActivationStream, StreamSettings
from msae_core.errors import MsaeError
from msae_core.sae import MomentumConfig, SAEConfig
from msae_core.runs.config import DataConfig, RunConfig, TrainConfig
from msae_core.runs.folder import read_status
from msae_core.training.trainer import train
from test_harvest import tiny_setup

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("stream"), n_docs=400)


def _stream(setup, batch=32, seed=0, cache="", part=(0, 1), **kw):
    settings = StreamSettings(**{"model": setup["model"], "corpus": setup["corpus"], "layer": 2,
                                 "context_size": 16, "lm_batch": 4, "buffer_batches": 4, **kw})
    return ActivationStream(settings, batch, seed, device="cpu", lm=setup["lm"], cache=cache, part=part)


def test_streamed_rows_are_the_harvested_rows(setup, tmp_path):
    """The same activations enter as a harvest of the same model, layer and corpus stores: every
    streamed row is a harvested row (special-token rows dropped alike), and the batches differ
    only by the buffer's shuffle."""
    store = harvest(StoreSettings(model=setup["model"], corpus=setup["corpus"], layer=2, target_tokens=600,
                                  context_size=16, dtype="float32"), tmp_path / "st", batch_size=4,
                    shard_tokens=10_000, progress=False, lm=setup["lm"])
    harvested = store.rows(torch.arange(store.n_rows))
    st = _stream(setup)
    streamed = torch.cat([st.batch_raw(s, 32, 0) for s in range(8)])  # 256 rows, 3 rounds
    nearest = torch.cdist(streamed, harvested).argmin(dim=1)
    torch.testing.assert_close(streamed, harvested[nearest], rtol=1e-5, atol=1e-6)
    # no row handed out twice: a value comes at most as often as the harvest holds it (a tiny
    # vocabulary repeats window beginnings, so equal rows exist)
    h_val, h_count = torch.unique(harvested, dim=0, return_counts=True)
    s_val, s_count = torch.unique(streamed, dim=0, return_counts=True)
    assert (s_count <= h_count[torch.cdist(s_val, h_val).argmin(dim=1)]).all()
    # shuffled: consecutive streamed rows are not consecutive harvested rows
    nearest = torch.cdist(streamed[:32], harvested).argmin(dim=1)
    assert not torch.equal(nearest, torch.sort(nearest).values)
    # deterministic in (settings, seed); another seed, another order
    st_again, st_other = _stream(setup), _stream(setup, seed=1)
    assert torch.equal(streamed, torch.cat([st_again.batch_raw(s, 32, 0) for s in range(8)]))
    other = torch.cat([st_other.batch_raw(s, 32, 1) for s in range(8)])
    assert not torch.equal(streamed, other)


def test_stream_state_resumes_the_same_batches(setup):
    st = _stream(setup)
    want = [st.batch_raw(s, 32, 0) for s in range(10)]
    st1 = _stream(setup)
    for s in range(6):
        st1.batch_raw(s, 32, 0)
    fields, tensors = st1.state(6)
    with pytest.raises(ValueError, match="before batch 6"):
        st1.state(3)
    # the checkpoint says where the packed stream stands: the resumed one starts there and
    # tokenises none of the documents read before it (a long run's prefix is not read again)
    assert fields["cursor"]["docs"] > 0
    st2 = _stream(setup)
    st2.restore(fields, {k: v.clone() for k, v in tensors.items()})
    given = []
    tokenizer = st2.lm.tokenizer

    class Counting:
        bos_token_id, eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id

        def __call__(self, texts, **kw):
            given.extend(texts)
            return tokenizer(texts, **kw)

    real_lm = st2.lm
    st2._lm = type("LM", (), {"tokenizer": Counting(), "__getattr__": lambda self, k: getattr(real_lm, k)})()
    for s in range(6, 10):
        assert torch.equal(st2.batch_raw(s, 32, 0), want[s])
    docs = [d.text for d in st2.corpus.documents()]
    assert given and given[0] == docs[fields["cursor"]["docs"]]
    # a checkpoint written before cursors (none in its fields) resumes the same, reading the prefix
    st3 = _stream(setup)
    st3.restore({k: v for k, v in fields.items() if k != "cursor"}, {k: v.clone() for k, v in tensors.items()})
    assert torch.equal(st3.batch_raw(6, 32, 0), want[6])
    with pytest.raises(ValueError, match="in order"):
        st2.batch_raw(3, 32, 0)


def test_input_sample_is_drawn_from_the_first_fill_and_read_once(setup):
    """The SAE's input-scale sample is drawn at random from the buffer's first fill (many windows,
    not the corpus's first rows), and read once: the first round is that fill, so the model runs
    over no window twice."""
    st = _stream(setup)
    sample = st.input_sample(200)  # the first fill: 200 rows (more than the 128-row buffer)
    windows_read = st.windows_used
    pool = torch.cat([st._buf.ready, st._buf.kept])
    assert len(sample) == 200 and len(pool) >= 200
    nearest = torch.cdist(sample, pool).argmin(dim=1)
    assert torch.equal(sample, pool[nearest])  # every sample row is a row of the first fill
    first_rows = _stream(setup)._rows(200, _stream(setup)._window_iter(0), 0)[0][:200]
    assert not torch.equal(sample, first_rows)  # not the corpus's first 200 rows in order
    first = st.batch_raw(0, 32, 0)
    assert st.windows_used == windows_read > 0  # the first batch read no window more
    assert torch.equal(first, pool[torch.cdist(first, pool).argmin(dim=1)])
    with pytest.raises(ValueError, match="before the stream's first batch"):
        st.input_sample(10)


def test_the_mixing_buffer_is_counted_in_rows_with_saelens_default():
    """buffer_rows, else buffer_batches batches, else SAELens's 20 x 32 context windows."""
    assert StreamSettings(context_size=1024).buffer_capacity(4096) == 655_360
    assert StreamSettings(context_size=128).buffer_capacity(4096) == 81_920
    assert StreamSettings(buffer_batches=16).buffer_capacity(4096) == 65_536
    assert StreamSettings(buffer_rows=1000, buffer_batches=16).buffer_capacity(4096) == 1000
    assert "buffer_rows must be >= 0" in "; ".join(DataConfig(source="stream", buffer_rows=-1).problems())


def test_stream_refuses_a_corpus_that_runs_out(setup, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("the cat sat on a mat")
    st = _stream({**setup, "corpus": str(short)})
    with pytest.raises(MsaeError, match="ran out"):
        st.batch_raw(0, 32, 0)


def _config(setup, steps=30):
    return RunConfig(sae=SAEConfig(arch="momentum", base="topk", d_sae=128, k=4, momentum=MomentumConfig(lam=0.1, tau=0.3)),
                     train=TrainConfig(steps=steps, batch_size=32, lr=1e-3, warmup_steps=3, seed=2,
                                       device="cpu", log_every=5, checkpoint_every=10, snapshot_every=10),
                     data=DataConfig(source="stream", model=setup["model"], corpus=setup["corpus"], layer=2,
                                     context_size=16, lm_batch=4, buffer_batches=4))


def test_streamed_run_killed_and_resumed_equals_uninterrupted(setup, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    assert train(_config(setup), ref, progress=False).state == "done"
    orig = BatchLoader.next

    def next_batch(self, s):
        if s == 25:
            raise RuntimeError("injected fault")
        return orig(self, s)

    monkeypatch.setattr(BatchLoader, "next", next_batch)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected"):
        train(_config(setup), run, progress=False)
    assert (run / "checkpoint" / "stream_buffer.safetensors").is_file()
    monkeypatch.undo()
    # resumed through the command line, from the folder's own config.json
    assert cli.main(["train", "--out", str(run), "--no-progress"]) == 0
    assert read_status(run)["state"] == "done"
    # the norm outliers of what was streamed, counted across the resume as in one go
    assert read_status(run)["stream_outliers"] == read_status(ref)["stream_outliers"]
    assert read_status(run)["stream_outliers"]["rows_seen"] > 0
    # where the packed stream stood after the run's windows, for the evals' hold-out: the same
    # after the resume (which started at the checkpoint's cursor) as in one go
    assert read_status(run)["stream_cursor"] == read_status(ref)["stream_cursor"]
    assert read_status(ref)["stream_cursor"]["docs"] > 0
    a, b = load_file(run / "sae.safetensors"), load_file(ref / "sae.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_streams_from_flags_and_checks_them(setup, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli.main(["train", "--source", "stream", "--model", setup["model"], "--corpus", setup["corpus"],
                   "--layer", "2", "--context-size", "16", "--lm-batch", "4", "--buffer-batches", "4",
                   "--arch", "topk", "--d-sae", "64", "--k", "4", "--steps", "6", "--batch-size", "32",
                   "--device", "cpu", "--log-every", "3", "--out", str(out), "--no-progress"])
    assert rc == 0 and read_status(out)["state"] == "done"
    cfg = RunConfig.load(out / "config.json")
    assert cfg.data.source == "stream" and cfg.sae.d_in == 64 and not cfg.data.acts
    from msae_core.evals.context import open_run

    ctx = open_run(out, device="cpu", progress=False)  # evals take model, layer, corpus from the run
    assert (ctx.model_name, ctx.layer, ctx.corpus_name) == (setup["model"], 2, setup["corpus"])
    assert ctx.manifest["n_windows"] == read_status(out)["stream_windows"] > 0  # held out by core
    from msae_core.inspect import features

    with pytest.raises(MsaeError, match="streamed without --cache"):
        features.feature_sample(out, n_rows=64)
    rc = cli.main(["train", "--source", "stream", "--model", setup["model"], "--model-dtype", "float8",
                   "--buffer-batches", "1", "--out", str(tmp_path / "bad"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "model_dtype must be one of" in err and "buffer_batches must be 0 (buffer_rows) or >= 2" in err
    assert not (tmp_path / "bad").exists()


def _all_rows(store):
    idx = torch.arange(store.n_rows)
    return store.rows(idx), store.row_info(idx)


def _harvested(setup, path, rows):
    return harvest(StoreSettings(model=setup["model"], corpus=setup["corpus"], layer=2, target_tokens=rows,
                                 context_size=16), path, batch_size=4, shard_tokens=10_000, progress=False,
                   lm=setup["lm"])


def _same_store(got, want, rows=None):
    rows = rows or want.n_rows
    (g_rows, g_info), (w_rows, w_info) = _all_rows(got), _all_rows(want)
    torch.testing.assert_close(g_rows[:rows], w_rows[:rows], rtol=0, atol=0)  # float16 both
    assert all(torch.equal(g_info[k][:rows], w_info[k][:rows]) for k in w_info)
    assert got.window_tokens(3) == want.window_tokens(3)


def test_stream_cache_resumes_to_the_harvested_store(setup, tmp_path):
    """A stream's cache holds every window the stream read, as a harvest of that many rows stores
    them, also across a resume: state() flushes the cache (every window read is in it at a
    checkpoint), a restored stream skips the windows the cache holds, and finish_cache makes it the
    complete harvest of its rows."""
    from msae_core.data.store import ActivationStore

    cache = str(tmp_path / "cache")
    st1 = _stream(setup, cache=cache)
    for s in range(6):
        st1.batch_raw(s, 32, 0)
    fields, tensors = st1.state(6)  # the checkpoint
    partial = ActivationStore(cache)
    assert not partial.manifest["complete"] and partial.manifest["n_windows"] == st1.windows_used
    for s in range(6, 9):  # read on past the checkpoint, then "killed"
        st1.batch_raw(s, 32, 0)
    st2 = _stream(setup, cache=cache)
    st2.restore(fields, tensors)
    for s in range(6, 20):
        st2.batch_raw(s, 32, 0)
    fields, tensors = st2.state(20)
    st2.finish_cache()
    got = ActivationStore(cache)
    assert got.manifest["complete"] and got.manifest["n_windows"] == st2.windows_used
    assert got.n_rows >= 20 * 32
    want = _harvested(setup, tmp_path / "harvested", got.n_rows)
    assert got.manifest["settings_hash"] == want.manifest["settings_hash"]
    assert got.manifest["n_windows"] == want.manifest["n_windows"]
    _same_store(got, want)
    # the stream counted the norms of every row it read, across the resume: the cache's rows
    o = st2.outlier_summary()
    norms = got.row_norms(np.arange(got.n_rows)).astype(np.float64)
    assert o["rows_seen"] == got.n_rows and o["n_rows"] == int((norms > o["threshold"]).sum())
    assert o["max_norm"] == pytest.approx(float(norms.max()), rel=1e-3)  # the cache is float16
    assert o["share_sq_norm"] == pytest.approx(float((norms[norms > o["threshold"]] ** 2).sum() / (norms ** 2).sum()),
                                               rel=1e-3, abs=1e-9)
    # resumed for more batches, the finished cache is taken over, grows and is finished again
    st3 = _stream(setup, cache=cache)
    st3.restore(fields, tensors)
    for s in range(20, 30):
        st3.batch_raw(s, 32, 0)
    st3.finish_cache()
    more = ActivationStore(cache)
    assert more.manifest["complete"] and more.n_rows > got.n_rows
    _same_store(more, _harvested(setup, tmp_path / "harvested30", more.n_rows))


def test_a_resumed_stream_that_reads_nothing_new_still_finishes_its_cache(setup, tmp_path):
    """Killed after the checkpoint of its last step, resumed with no window left to read: the
    cache is made complete (it stayed complete: false with the open-ended target); its meta is
    the manifest's, so no model is needed for it."""
    from msae_core.data.store import ActivationStore

    cache = str(tmp_path / "cache")
    st1 = _stream(setup, cache=cache)
    for s in range(6):
        st1.batch_raw(s, 32, 0)
    fields, tensors = st1.state(6)  # the last checkpoint; then killed before finish_cache
    assert not ActivationStore(cache).manifest["complete"]
    st2 = _stream(setup, cache=cache)
    st2.restore(fields, tensors)
    st2.finish_cache()  # the run had reached its steps: nothing streamed in this process
    got = ActivationStore(cache)
    assert got.manifest["complete"] and got.manifest["n_windows"] == st1.windows_used
    assert got.manifest["target_tokens"] == got.n_rows
    _same_store(got, _harvested(setup, tmp_path / "harvested", got.n_rows))


def test_streamed_run_reads_its_rows_back_from_its_cache(setup, tmp_path):
    """A run with --cache: at its end the cache is the harvest of every row the stream read; the
    workbench and the evals read the run's rows and manifest from it; resumed for more steps, the
    run keeps its cache whole."""
    from msae_core.data.store import ActivationStore
    from msae_core.evals.context import open_run
    from msae_core.inspect.run_files import run_store_path

    cfg = _config(setup, 30)
    cfg.data.cache = str(tmp_path / "cache")
    run = tmp_path / "run"
    assert train(cfg, run, progress=False).state == "done"
    got = ActivationStore(tmp_path / "cache")
    assert got.manifest["complete"] and got.n_rows >= 30 * 32
    _same_store(got, _harvested(setup, tmp_path / "harvested", got.n_rows))
    assert run_store_path(run) == str(tmp_path / "cache")
    ctx = open_run(run, device="cpu", progress=False)
    assert ctx.manifest["d_model"] == 64 and ctx.manifest["source"] == "stream"
    assert ctx.manifest["n_windows"] == read_status(run)["stream_windows"] == got.manifest["n_windows"]
    from msae_core.inspect import features

    sample = features.feature_sample(run, n_rows=256)  # the Feature pages' token examples
    assert sample.store_path == str(tmp_path / "cache") and len(sample.rows) >= 256
    info = got.row_info(torch.from_numpy(sample.rows))
    assert torch.equal(info["window_ids"], torch.from_numpy(sample.window_ids).long())
    cfg.train.steps = 40
    assert train(cfg, run, progress=False).state == "done"
    longer = ActivationStore(tmp_path / "cache")
    assert longer.manifest["complete"] and longer.n_rows >= 40 * 32
    assert longer.manifest["n_windows"] == read_status(run)["stream_windows"]
    _same_store(longer, _harvested(setup, tmp_path / "harvested40", longer.n_rows))


def test_stream_cache_refusals(setup, tmp_path, capsys):
    """A cache folder holding another harvest is refused before the model loads, in one line; a
    cache without streaming, or of another dtype, is a listed problem."""
    harvest(StoreSettings(model=setup["model"], corpus=setup["corpus"], layer=1, target_tokens=50,
                          context_size=16), tmp_path / "other", batch_size=4, progress=False, lm=setup["lm"])
    base = ["train", "--model", setup["model"], "--corpus", setup["corpus"], "--layer", "2",
            "--context-size", "16", "--d-sae", "64", "--k", "4", "--steps", "4", "--batch-size", "32",
            "--device", "cpu", "--no-progress"]
    rc = cli.main(base + ["--source", "stream", "--cache", str(tmp_path / "other"), "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "data.cache" in err and "already holds a different harvest" in err
    rc = cli.main(base + ["--acts", str(tmp_path / "other"), "--cache", str(tmp_path / "c"),
                          "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "only a streamed run writes a cache" in err
    rc = cli.main(base + ["--source", "stream", "--cache", str(tmp_path / "c"), "--cache-dtype", "int8",
                          "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "cache_dtype must be float16 or float32" in err
    assert not any((tmp_path / n).exists() for n in ("a", "b", "c", "d"))


def test_ranks_stream_their_own_windows(setup, tmp_path):
    """Data-parallel: chunks of lm_batch windows are dealt out to the ranks in turn, so the ranks'
    windows are disjoint and together every window; each rank serves batch / ranks rows; a rank's
    checkpoint entry restores only that rank, and a checkpoint of another rank count is refused."""
    from msae_core.data.stream import merge_rank_states

    ranks = [_stream(setup, part=(r, 2)) for r in range(2)]
    seen = [[g for g, _, _ in itertools.islice(st._window_iter(0), 12)] for st in ranks]
    assert seen[0] == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]  # lm_batch 4
    assert seen[1] == [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]
    batches = [[st.batch_raw(s, 32, 0, part=(r, 2)) for s in range(5)] for r, st in enumerate(ranks)]
    assert all(b.shape == (16, 64) for bs in batches for b in bs)
    assert not torch.equal(batches[0][0], batches[1][0])
    store = harvest(StoreSettings(model=setup["model"], corpus=setup["corpus"], layer=2, target_tokens=1500,
                                  context_size=16, dtype="float32"), tmp_path / "st", batch_size=4,
                    shard_tokens=10_000, progress=False, lm=setup["lm"])
    harvested = store.rows(torch.arange(store.n_rows))
    window_of = store.row_info(torch.arange(store.n_rows))["window_ids"]
    for r, bs in enumerate(batches):  # every row of a rank is a harvested row of that rank's windows
        rows, mine = torch.cat(bs), (window_of // 4) % 2 == r
        assert torch.cdist(rows, harvested[mine]).min(dim=1).values.max() < 1e-3  # cdist rounding
        # (a tiny vocabulary repeats window beginnings, so some rows are in both ranks' windows)
        assert torch.cdist(rows, harvested[~mine]).min(dim=1).values.gt(1e-3).any()
    fields, tensors = merge_rank_states([st.state(5) for st in ranks])
    assert len(fields["ranks"]) == 2 and any(k.startswith("rank1.") for k in tensors)
    again = _stream(setup, part=(1, 2))
    again.restore(fields, tensors)
    nxt = ranks[1].batch_raw(5, 32, 0, part=(1, 2))
    assert torch.equal(again.batch_raw(5, 32, 0, part=(1, 2)), nxt)
    with pytest.raises(MsaeError, match="written by 2 rank"):
        _stream(setup).restore(fields, tensors)
    with pytest.raises(MsaeError, match="not supported under torchrun"):
        _stream(setup, cache="/tmp/x", part=(0, 2))


def test_a_store_and_a_stream_are_activation_sources(setup, tmp_path):
    """Both satisfy data.source.ActivationSource; only the stream the streamed sub-protocol, and
    `streamed` says which, for the code that must tell them apart."""
    from msae_core.data.source import ActivationSource, StreamedSource
    from msae_core.data.store import ActivationStore

    st = _stream(setup)
    store = ActivationStore(_harvested(setup, tmp_path / "h", 256).path)
    assert isinstance(st, ActivationSource) and isinstance(st, StreamedSource) and st.streamed
    assert isinstance(store, ActivationSource) and not isinstance(store, StreamedSource) and not store.streamed


def _members(setup):
    """Momentum over TopK, and TopK with another init seed and fewer steps, on one stream."""
    mom = _config(setup)
    topk = dataclasses.replace(mom, sae=dataclasses.replace(mom.sae, arch="topk", seed=1),
                               train=dataclasses.replace(mom.train, steps=22))
    return {"mom": mom, "topk": topk}


@pytest.fixture(scope="module")
def streamed_alone(setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed-alone")
    for name, cfg in _members(setup).items():
        assert train(cfg, root / name, progress=False).state == "done"
    return root


def _same_run(a, b):
    wa, wb = load_file(a / "sae.safetensors"), load_file(b / "sae.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = [[{k: v for k, v in json.loads(line).items() if k not in ("step_time_s", "tokens_per_s", "time")}
             for line in (p / "metrics.jsonl").read_text().splitlines()] for p in (a, b)]
    assert rows[0] == rows[1]
    sa, sb = read_status(a), read_status(b)
    assert (sa["stream_windows"], sa["stream_cursor"]) == (sb["stream_windows"], sb["stream_cursor"])


def test_a_streamed_group_runs_the_model_once_per_batch_and_equals_each_run_alone(setup, streamed_alone,
                                                                                  tmp_path, monkeypatch):
    from msae_core.data import harvest as harvest_mod
    from msae_core.training.group import train_group

    forwarded = []
    orig = harvest_mod.window_rows
    monkeypatch.setattr(harvest_mod, "window_rows", lambda lm, ids, *a, **k: forwarded.append(ids.shape[0])
                        or orig(lm, ids, *a, **k))
    members = _members(setup)
    results = train_group(list(members.values()), [tmp_path / n for n in members], progress=False)
    assert [r.state for r in results] == ["done", "done"]
    alone_windows = read_status(streamed_alone / "mom")["stream_windows"]
    assert sum(forwarded) == alone_windows  # each window through the model once, for both runs
    for name in members:
        _same_run(tmp_path / name, streamed_alone / name)
    assert not (tmp_path / "mom" / ".group-stream").exists()  # the group's stream state goes when all are done


@pytest.mark.parametrize("lose_state", [False, True])
def test_a_killed_streamed_group_resumes_from_its_stream_checkpoint(setup, streamed_alone, tmp_path, monkeypatch,
                                                                     lose_state):
    """Killed at batch 25 (the checkpoints at 10 and 20 written, the 22-step member done): the group's
    stream state at 20, kept once for the group, resumes the stream there; without it (a kill between
    a member's checkpoint and the group's) the group streams again from the start and the member
    skips what it did. Either way each run equals its run alone."""
    from msae_core.training.group import train_group

    members = _members(setup)
    outs = [tmp_path / n for n in members]
    orig = BatchLoader.next

    def dies(self, s):
        if s == 25:
            raise KeyboardInterrupt
        return orig(self, s)

    monkeypatch.setattr(BatchLoader, "next", dies)
    with pytest.raises(KeyboardInterrupt):
        train_group(list(members.values()), outs, progress=False)
    monkeypatch.undo()
    saved = sorted(p.name for p in (outs[0] / ".group-stream").iterdir())
    assert saved == ["stream-000000020.json", "stream-000000020.safetensors"]  # older states pruned
    if lose_state:
        for p in (outs[0] / ".group-stream").iterdir():
            p.unlink()
    assert [r.state for r in train_group(list(members.values()), outs, progress=False)] == ["done", "done"]
    for out in outs:
        _same_run(out, streamed_alone / out.name)


def test_a_streamed_group_at_two_layers_runs_one_forward_and_equals_each_run_alone(setup, tmp_path, monkeypatch):
    """Runs at layers 1 and 2 of one model stream in one pass: one forward per window, stopped
    after block 2, each run reading its layer's columns, and each equal to its run alone (the
    outlier summary of its own layer too); each layer's --cache is the store its run alone
    writes."""
    from msae_core.data.store import ActivationStore
    from msae_core.data.lm import LanguageModel as LM
    from msae_core.training.group import train_group

    at2 = _config(setup, steps=12)
    at1 = dataclasses.replace(at2, sae=dataclasses.replace(at2.sae, arch="topk", seed=1),
                              data=dataclasses.replace(at2.data, layer=1))

    def cached(cfg, folder):
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache=str(folder)))

    for name, cfg in (("L2", at2), ("L1", at1)):
        alone = tmp_path / "alone" / name
        assert train(cached(cfg, alone / "cache"), alone, progress=False).state == "done"
    forwards = []
    orig = LM.resid_posts
    monkeypatch.setattr(LM, "resid_posts", lambda self, ids, layers, *a, **k: forwards.append(tuple(layers))
                        or orig(self, ids, layers, *a, **k))
    results = train_group([cached(at2, tmp_path / "cacheL2"), cached(at1, tmp_path / "cacheL1")],
                          [tmp_path / "L2", tmp_path / "L1"], progress=False)
    assert [r.state for r in results] == ["done", "done"]
    assert forwards and set(forwards) == {(2, 1)}  # both layers from each forward
    for name in ("L2", "L1"):
        _same_run(tmp_path / name, tmp_path / "alone" / name)
        assert read_status(tmp_path / name)["stream_outliers"] == read_status(tmp_path / "alone" / name)["stream_outliers"]
    assert read_status(tmp_path / "L1")["stream_outliers"] != read_status(tmp_path / "L2")["stream_outliers"]
    for name in ("L2", "L1"):
        mine, theirs = ActivationStore(tmp_path / f"cache{name}"), ActivationStore(tmp_path / "alone" / name / "cache")
        assert mine.n_rows == theirs.n_rows > 0 and mine.manifest["layer"] == theirs.manifest["layer"]
        assert torch.equal(mine.rows(torch.arange(mine.n_rows)), theirs.rows(torch.arange(theirs.n_rows)))
