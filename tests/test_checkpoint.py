"""Checkpoint files under misuse: files that are not ours are refused in our words."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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
    ckpt["bayesian_layers"] = None  # files written before the layout was stored still load
    torch.save(ckpt, tmp_path / "old.pt")
    load_checkpoint(tmp_path / "old.pt")


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["checkpoint_v1.pt", "checkpoint_v1_without_layout.pt"])
def test_every_earlier_checkpoint_format_still_loads_and_predicts_what_it_did(name):
    """The metatrain habit: one committed file of each earlier format (a tiny PaiNN written by
    format version 1, with and without ``bayesian_layers``) is upgraded on load and gives the
    MAP energy and forces it gave when it was written (``checkpoint_v1_reference.json``)."""
    from ase.build import molecule

    from blip_ase import BLIPCalculator
    from blip_ase.models.checkpoint import FORMAT_VERSION, read_checkpoint

    raw = torch.load(FIXTURES / name, weights_only=True)
    assert raw["format_version"] == 1 and FORMAT_VERSION == 2
    ckpt = read_checkpoint(FIXTURES / name)
    assert ckpt["format_version"] == FORMAT_VERSION and ckpt["upgraded_from"] == 1
    assert (ckpt["bayesian_layers"] is None) == ("without_layout" in name)
    reference = json.loads((FIXTURES / "checkpoint_v1_reference.json").read_text())
    atoms = molecule("NH3")
    atoms.calc = BLIPCalculator.from_checkpoint(FIXTURES / name, mode="map", device="cpu")
    assert atoms.get_potential_energy() == pytest.approx(reference["map_energy_eV"], abs=1e-6)
    np.testing.assert_allclose(atoms.get_forces(), reference["map_forces_eV_per_A"], atol=1e-6)
    assert atoms.calc.calibration["forces"] == 2.0


def test_a_checkpoint_missing_a_required_key_is_named_as_damaged(tmp_path):
    from blip_ase.models import save_checkpoint

    save_checkpoint(tmp_path / "m.pt", tiny_painn())
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    assert ckpt["format_version"] == 2
    del ckpt["bayesian_layers"]
    torch.save(ckpt, tmp_path / "damaged.pt")
    with pytest.raises(CheckpointError, match=r"damaged checkpoint: format version 2 requires the keys \['bayesian_layers'\]"):
        load_checkpoint(tmp_path / "damaged.pt")
