"""Experiment trackers mirror the run folder: TensorBoard event files written without TensorFlow,
checked here with protocol buffers built from the Event message's published field numbers."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from msae_core.artifacts import RUN_METRICS
from msae_core.configutil import collect_problems
from msae_core.data.loader import BatchLoader
from msae_core.runs.config import TrainConfig
from msae_core.runs.tracking import TENSORBOARD_DIR, crc32c, read_records
from msae_core.training.trainer import train
from test_train import make_config, make_store


def _event_class():
    """tensorflow/core/util/event.proto's Event, Summary and Summary.Value (the fields used)."""
    f = descriptor_pb2.FileDescriptorProto(name="msae_test_event.proto", package="tbtest", syntax="proto3")
    F = descriptor_pb2.FieldDescriptorProto
    value = f.message_type.add(name="Value")
    value.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL)
    summary = f.message_type.add(name="Summary")
    summary.field.add(name="value", number=1, type=F.TYPE_MESSAGE, type_name=".tbtest.Value", label=F.LABEL_REPEATED)
    ev = f.message_type.add(name="Event")
    ev.field.add(name="wall_time", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    ev.field.add(name="step", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    ev.field.add(name="file_version", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    ev.field.add(name="summary", number=5, type=F.TYPE_MESSAGE, type_name=".tbtest.Summary", label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tbtest.Event"))


def _events(run):
    files = sorted((run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert len(files) == 1
    Event = _event_class()
    return [Event.FromString(r) for r in read_records(files[0])]


def _assert_mirrors_metrics(run):
    events = _events(run)
    assert events[0].file_version == "brain.Event:2"
    rows = [json.loads(line) for line in (run / RUN_METRICS).read_text().splitlines()]
    assert [e.step for e in events[1:]] == [r["step"] for r in rows]
    for e, r in zip(events[1:], rows):
        got = {v.tag: v.simple_value for v in e.summary.value}
        want = {k: v for k, v in r.items() if k not in ("step", "time") and isinstance(v, (int, float))}
        assert got.keys() == want.keys() and "loss" in got
        assert all(got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-30) for k in got)
        assert e.wall_time == r["time"]


def test_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C catalogue's check value


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("track") / "store")


def test_tensorboard_mirrors_every_metrics_line_and_a_resume_rewrites_it(store, tmp_path, monkeypatch):
    cfg = make_config(store)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, log_to=["tensorboard"]))
    whole = tmp_path / "whole"
    assert train(cfg, whole, progress=False).state == "done"
    _assert_mirrors_metrics(whole)
    # killed after its checkpoint at 20 with lines up to 25 logged: the resumed mirror holds each
    # step once, as metrics.jsonl does
    orig = BatchLoader.next

    def dies(self, s):
        if s == 27:
            raise KeyboardInterrupt
        return orig(self, s)

    monkeypatch.setattr(BatchLoader, "next", dies)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, progress=False)
    monkeypatch.undo()
    assert [e.step for e in _events(run)[1:]][-1] == 25
    assert train(cfg, run, progress=False).state == "done"
    _assert_mirrors_metrics(run)
    assert [e.step for e in _events(run)] == [e.step for e in _events(whole)]


def test_unknown_or_missing_trackers_are_named(monkeypatch):
    import importlib.util

    assert "log_to: unknown tracker(s) mlflow" in " ".join(collect_problems(TrainConfig(log_to=["mlflow"])))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert "wandb is not installed" in " ".join(collect_problems(TrainConfig(log_to=["wandb"])))
