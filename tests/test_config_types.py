"""Wrongly typed settings are refused in the config layer, once, with one line naming the field,
the expected type and the value given: table-driven over every field of every run config."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Literal, get_args, get_origin

import pytest

from msae_core.cli import main
from msae_core.configutil import collect_problems, from_dict
from msae_core.errors import MsaeError
from msae_core.evals import EVALS, eval_module
from msae_core.runs.config import DataConfig, RunConfig, TrainConfig
from msae_core.sae import MomentumConfig, SAEConfig

# for each kind of annotation: values of the wrong type, as json would bring them
WRONG = {
    int: ["64", 64.5, None, True, [64]],
    float: ["3e-4", None, False, [0.1]],
    str: [5, None, ["a"], {"a": 1}],
    bool: ["yes", 1, None],
    list: ["core", 3, None, [1]],
    Literal: [3, None, "no-such-choice"],
}


def _kind(t):
    origin = get_origin(t)
    if origin is Literal:
        return Literal
    if origin in (list, tuple):
        return list
    return t if t in WRONG else None


def _fields(cls):
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls)]


SECTIONS = (("sae", SAEConfig), ("sae.momentum", MomentumConfig), ("train", TrainConfig), ("data", DataConfig))
CASES = [(section, cls, name, value)
         for section, cls in SECTIONS
         for name, t in _fields(cls) if _kind(t) is not None
         for value in WRONG[_kind(t)]
         if not (get_origin(t) in (list, tuple) and get_args(t) and get_args(t)[0] is not str
                 and value == [1])]


def test_every_run_config_field_is_covered():
    covered = {(s, n) for s, _, n, _ in CASES}
    every = {(s, f.name) for s, cls in SECTIONS for f in dataclasses.fields(cls)}
    assert covered == every - {("sae", "momentum")}  # a section of its own, covered as sae.momentum


def _nested(section: str, name: str, value) -> dict:
    """{"sae.momentum", "lam", v} -> {"sae": {"momentum": {"lam": v}}}."""
    out = {name: value}
    for part in reversed(section.split(".")):
        out = {part: out}
    return out


@pytest.mark.parametrize("section,cls,name,value", CASES,
                         ids=[f"{s}.{n}={json.dumps(v)}" for s, _, n, v in CASES])
def test_wrong_type_in_a_config_file_is_named(section, cls, name, value):
    with pytest.raises(MsaeError) as err:
        RunConfig.from_dict(_nested(section, name, value))
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{section}.{name}: expected " in msg
    assert f"got {json.dumps(value)}" in msg


def test_right_types_are_taken_and_ints_become_floats():
    cfg = RunConfig.from_dict({"sae": {"d_sae": 64, "lam": 0, "arch": "momentum"},
                               "train": {"lr": 1, "evals": ["core"], "bf16": True},
                               "data": {"acts": "x"}})
    assert cfg.sae.d_sae == 64 and cfg.sae.arch == "momentum"
    assert isinstance(cfg.sae.momentum.lam, float) and isinstance(cfg.train.lr, float)
    assert cfg.train.evals == ["core"] and cfg.train.bf16 is True


def test_several_wrong_fields_in_one_line():
    with pytest.raises(MsaeError, match=r"sae\.d_sae: expected an integer, got 64\.5; "
                                        r"sae\.k: expected an integer, got \"8\""):
        RunConfig.from_dict({"sae": {"d_sae": 64.5, "k": "8"}})
    with pytest.raises(MsaeError, match=r"train\.evals: expected a list of strings, got \"core\""):
        RunConfig.from_dict({"train": {"evals": "core"}})
    with pytest.raises(MsaeError, match=r"section train must be an object"):
        RunConfig.from_dict({"train": [1, 2]})


def test_a_config_built_in_code_is_checked_too():
    cfg = RunConfig(sae=SAEConfig(d_in=64, d_sae="64"), train=TrainConfig(lr=None))
    problems = collect_problems(cfg)
    assert "sae.d_sae: expected an integer, got \"64\"" in problems
    assert "train.lr: expected a number, got null" in problems


@pytest.mark.parametrize("name", sorted(EVALS))
def test_eval_settings_are_typed(name):
    cls = eval_module(name).Config
    for fname, t in _fields(cls):
        if _kind(t) in (int, float):
            with pytest.raises(MsaeError, match=rf"{name}\.{fname}: expected .*got \"abc\""):
                from_dict(cls, {fname: "abc"}, prefix=f"{name}.")


def test_cli_refuses_a_wrongly_typed_config_file(tmp_path, capsys):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"sae": {"d_sae": "big"}, "train": {"steps": 10}, "data": {"acts": 5}}))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("msae: error:")
    assert 'sae.d_sae: expected an integer, got "big"' in err
    assert "data.acts: expected a string, got 5" in err
    assert not (tmp_path / "run").exists()
