"""The one device resolver serves train, harvest and evals alike."""

import pytest
import torch

from msae_core.devices import resolve_device
from msae_core.errors import MsaeError


def test_auto_and_none_pick_cuda_only_when_present():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    assert resolve_device(None).type == want
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu0", "cuda:x", ""])
def test_unknown_names_are_one_line_errors(name):
    with pytest.raises(MsaeError, match="unknown device") as err:
        resolve_device(name)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(MsaeError, match="CUDA is not available"):
        resolve_device("cuda:0")


def test_load_lm_accepts_auto_like_train(tmp_path):
    """`--device auto` once worked for `msae train` only (load_lm had its own rule and refused it)."""
    from msae_core.data.lm import load_lm, save_tiny_model

    save_tiny_model(tmp_path / "m", family="llama", d_model=32, n_layers=2, seed=0)
    lm = load_lm(str(tmp_path / "m"), device="auto")
    assert lm.device == resolve_device("auto")
    with pytest.raises(MsaeError, match="unknown device"):
        load_lm(str(tmp_path / "m"), device="gpu0")
