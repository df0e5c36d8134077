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
