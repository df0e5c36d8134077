"""Checkpoint files under misuse: files that are not ours are refused in our words."""

from __future__ import annotations

import pytest
import torch

from blip_ase.cli.main import main as blip
from blip_ase.models import CheckpointError, load_checkpoint


class CarriesCode:
    """A pickle that would call ``print`` when unpickled without ``weights_only``."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_a_pickle_carrying_code_is_refused_without_suggesting_unsafe_loading(tmp_path, capsys):
    """torch's own refusal says "re-running torch.load with weights_only set to False will likely
    succeed": passing that on would advise users to run the file's code."""
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "payload": CarriesCode()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert f"{path} is not a blip-ase checkpoint" in message and "could run code, so it was refused" in message
    assert "weights_only" not in message and "trusted source" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    code = blip(["md", "--model", str(path), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "is not a blip-ase checkpoint" in err and "weights_only" not in err
    assert "this ran while loading" not in err


def test_a_file_that_is_not_a_torch_file_is_named_as_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "junk.pt")
    assert "is not a blip-ase checkpoint: not a readable torch.save file" in str(info.value)
    assert "weights_only" not in str(info.value)


def tiny_painn():
    from blip_ase.bayes import BayesConfig
    from blip_ase.models import PaiNNConfig, PaiNNPotential

    torch.manual_seed(0)
    return PaiNNPotential([1, 7], PaiNNConfig(n_features=8, n_interactions=2, n_rbf=6, cutoff=4.0), BayesConfig())


def test_the_checkpoint_stores_the_bayesian_layers_in_column_order(tmp_path):
    from blip_ase.models import save_checkpoint

    model = tiny_painn()
    save_checkpoint(tmp_path / "m.pt", model)
    stored = torch.load(tmp_path / "m.pt", weights_only=True)["bayesian_layers"]
    assert stored == model.bayesian_layout()
    columns = {name: m.column for name, m in model.named_modules() if hasattr(m, "column")}
    assert [columns[n] for n in stored["edge"]] == list(range(len(stored["edge"]))) and stored["node"]


def test_a_reordering_of_the_bayesian_layers_is_refused_at_load(tmp_path):
    """A silent reordering (e.g. after an orb-models upgrade) would permute alpha's columns."""
    from blip_ase.models import save_checkpoint

    save_checkpoint(tmp_path / "m.pt", tiny_painn())
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    edge = ckpt["bayesian_layers"]["edge"]
    edge[0], edge[1] = edge[1], edge[0]
    torch.save(ckpt, tmp_path / "swapped.pt")
    expected = r"wraps other edge layers \(alpha columns\).*first difference at column 0"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(tmp_path / "swapped.pt")
    del ckpt["bayesian_layers"]  # files written before the layout was stored still load
    torch.save(ckpt, tmp_path / "old.pt")
    load_checkpoint(tmp_path / "old.pt")
