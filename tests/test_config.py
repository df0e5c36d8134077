"""The one configuration loader (blip_ase.configuration) behind train, md and learn."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from blip_ase.configuration import PATH, checked_int, from_dict, load_yaml, with_overrides
from blip_ase.md.config import MDConfig
from blip_ase.md.monitor import Thresholds
from blip_ase.training.config import TrainConfig, load_config


@dataclass(frozen=True)
class Inner:
    path: str | None = field(default=None, metadata=PATH)
    files: list[str] = field(default_factory=list, metadata=PATH)
    kind: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Outer:
    count: int = 1
    scale: float = 1.0
    flag: bool = False
    name: str = "x"
    pair: tuple[float | None, float | None] = (None, None)
    table: dict[str, tuple[float, float]] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)
    maybe: Inner | None = None

    def __post_init__(self):
        checked_int(self.count, least=1, name="count")


# ------------------------------------------------------------------------------------ from_dict


def test_nested_sections_lists_and_pairs_are_built_and_converted():
    cfg = from_dict(Outer, {"scale": 2, "pair": [1, None], "table": {"H": [0.1, 1]}, "inner": {"kind": "b"},
                            "maybe": {"path": "p"}})  # fmt: skip
    assert cfg.scale == 2.0 and isinstance(cfg.scale, float)
    assert cfg.pair == (1.0, None) and cfg.table == {"H": (0.1, 1.0)}
    assert cfg.inner == Inner(kind="b") and cfg.maybe == Inner(path="p")
    assert from_dict(Outer, {"inner": None}).inner == Inner()  # an empty YAML section keeps the defaults


def test_an_unknown_key_is_refused_with_the_allowed_keys():
    allowed = r"allowed: \['path', 'files', 'kind'\]"
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['kindd'\] in cfg.inner; " + allowed):
        from_dict(Outer, {"inner": {"kindd": "a"}}, "cfg")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"count": True}, "cfg.count must be an integer, got True"),
        ({"count": 1.5}, "cfg.count must be an integer, got 1.5"),
        ({"count": "3"}, "cfg.count must be an integer, got '3'"),
        ({"scale": False}, "cfg.scale must be a finite number, got False"),
        ({"scale": math.nan}, "cfg.scale must be a finite number, got nan"),
        ({"scale": math.inf}, "cfg.scale must be a finite number, got inf"),
        ({"scale": "1e-3"}, "cfg.scale must be a finite number, got '1e-3' (text: YAML reads"),
        ({"flag": 1}, "cfg.flag must be true or false, got 1"),
        ({"flag": "yes"}, "cfg.flag must be true or false, got 'yes'"),
        ({"name": 3}, "cfg.name must be a string, got 3"),
        ({"pair": [1.0]}, "cfg.pair must list 2 values, got 1: [1.0]"),
        ({"pair": [1.0, "x"]}, "cfg.pair[1] must be a finite number or null, got 'x'"),
        ({"table": {"H": [1.0, math.nan]}}, "cfg.table.H[1] must be a finite number, got nan"),
        ({"table": [1]}, "cfg.table must be a mapping, got [1]"),
        ({"inner": {"kind": "c"}}, "cfg.inner.kind must be one of ['a', 'b'], got 'c'"),
        ({"inner": 3}, "cfg.inner must be a mapping, got 3"),
        ({"maybe": {"kind": "c"}}, "cfg.maybe.kind must be one of ['a', 'b'], got 'c'"),
        ({"maybe": "x"}, "cfg.maybe must be a mapping or null, got 'x'"),
        ({"inner": {"files": "a.xyz"}}, "cfg.inner.files must be a list, got 'a.xyz'"),
        ({"count": 0}, "cfg: count must be an integer >= 1, got 0"),
    ],
)
def test_a_bad_value_is_a_value_error_naming_the_key_and_the_problem(data, message):
    with pytest.raises(ValueError) as info:
        from_dict(Outer, data, "cfg")
    assert str(info.value).startswith(message), str(info.value)


def test_checked_int_refuses_bools_floats_and_small_values_and_accepts_numpy_integers():
    assert checked_int(np.int64(3), least=1, name="n") == 3 and type(checked_int(np.int64(3), name="n")) is int
    assert checked_int(-4, name="seed") == -4
    for bad in (True, 2.0, "2", None, 0):
        with pytest.raises(ValueError, match=rf"n must be an integer >= 1, got {bad!r}"):
            checked_int(bad, least=1, name="n")


# ------------------------------------------------------------------------------------ overrides


def test_overrides_go_through_the_same_checks_as_the_file():
    cfg = from_dict(Outer, {"inner": {"kind": "b", "path": "p"}})
    new = with_overrides(cfg, {"inner": {"kind": "a"}, "count": 4})
    assert new.inner == Inner(kind="a", path="p") and new.count == 4
    assert with_overrides(cfg, {"maybe": {"kind": "b"}}).maybe == Inner(kind="b")  # a None section from a mapping
    for overrides, message in [
        ({"inner": {"kind": "c"}}, r"overrides.inner.kind must be one of \['a', 'b'\], got 'c'"),
        ({"count": True}, "overrides.count must be an integer, got True"),
        ({"count": 0}, "overrides: count must be an integer >= 1, got 0"),
        ({"cont": 1}, r"unknown key\(s\) \['cont'\] in overrides; allowed"),
    ]:
        with pytest.raises(ValueError, match=message):
            with_overrides(cfg, overrides)


def test_a_literal_override_through_load_config_is_checked(tmp_path):
    """Before: load_config applied overrides with dataclasses.replace, which skipped the Literal check."""
    (tmp_path / "c.yaml").write_text("epochs: 3\n")
    assert load_config(tmp_path / "c.yaml", dtype="float64", seed=None).dtype == "float64"
    with pytest.raises(ValueError, match=r"overrides.dtype must be one of \['float32', 'float64'\], got 'float16'"):
        load_config(tmp_path / "c.yaml", dtype="float16")
    with pytest.raises(ValueError, match="overrides.epochs must be an integer, got True"):
        load_config(tmp_path / "c.yaml", epochs=True)


# ------------------------------------------------------------------------------------ YAML files


def test_relative_path_fields_are_resolved_against_the_yaml_files_directory(tmp_path, monkeypatch):
    sub = tmp_path / "configs"
    sub.mkdir()
    (sub / "c.yaml").write_text("inner: {path: w.pt, files: [a.xyz, /abs/b.xyz, c.traj@-1]}\nmaybe: {path: ~/x.pt}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_yaml("configs/c.yaml", Outer)
    assert cfg.inner.path == str(sub.resolve() / "w.pt")
    assert cfg.inner.files == [str(sub.resolve() / "a.xyz"), "/abs/b.xyz", str(sub.resolve() / "c.traj@-1")]
    assert cfg.maybe.path == str(Path("~/x.pt").expanduser())
    # overrides are taken as given (a command line's paths are relative to the working directory)
    assert load_yaml("configs/c.yaml", Outer, {"inner": {"path": "o.pt"}}).inner.path == "o.pt"


def test_a_relative_orb_weights_path_is_relative_to_the_training_config(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("backend: orb\norb: {weights_path: base/orb.ckpt}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("run/config.yaml")
    assert cfg.orb.weights_path == str(tmp_path.resolve() / "run" / "base" / "orb.ckpt")
    assert load_config("run/config.yaml", epochs=2).orb.weights_path == cfg.orb.weights_path


def test_missing_malformed_and_non_mapping_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config file \S*none.yaml does not exist"):
        load_yaml(tmp_path / "none.yaml", Outer)
    (tmp_path / "bad.yaml").write_text("count: [1\n")
    with pytest.raises(ValueError, match=r"bad.yaml is not valid YAML: .*line"):
        load_yaml(tmp_path / "bad.yaml", Outer)
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match=r"list.yaml must hold a mapping, got list"):
        load_yaml(tmp_path / "list.yaml", Outer)
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert load_yaml(tmp_path / "empty.yaml", Outer) == Outer()


def test_yaml_text_for_a_number_gets_a_hint(tmp_path):
    (tmp_path / "c.yaml").write_text("optim: {lr: 1e-3}\n")
    with pytest.raises(ValueError, match=r"c.yaml.optim.lr must be a finite number, got '1e-3' \(text: .*0.001\)"):
        load_config(tmp_path / "c.yaml")


# ------------------------------------------------------------------------------------ the configs


@pytest.mark.parametrize(
    "text, message",
    [
        ("epochs: true\n", "c.yaml.epochs must be an integer, got True"),
        ("batch_size: 0\n", "batch_size must be an integer >= 1, got 0"),
        ("ensemble: 0\n", "ensemble must be an integer >= 1, got 0"),
        ("seed: -1\n", "seed must be an integer >= 0, got -1"),
        ("optim: {plateau_patience: -1}\n", "plateau_patience must be an integer >= 0, got -1"),
        ("deterministic: 1\n", "c.yaml.deterministic must be true or false, got 1"),
        ("elements: [1, true]\n", r"c.yaml.elements\[1\] must be an integer, got True"),
        ("orb: {weights_path: 3}\n", "c.yaml.orb.weights_path must be a string or null, got 3"),
    ],
)
def test_the_training_config_refuses_bad_values_naming_them(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(tmp_path / "c.yaml")


def test_every_shipped_training_config_loads():
    root = Path(__file__).resolve().parents[1] / "examples"
    for path in [*root.glob("*/config.yaml"), root / "active_learning" / "start_train.yaml"]:
        assert isinstance(load_config(path), TrainConfig), path


def test_a_training_config_round_trips_through_asdict_as_a_checkpoint_stores_it():
    cfg = load_config(Path(__file__).resolve().parents[1] / "examples" / "ammonia" / "config.yaml")
    assert from_dict(TrainConfig, json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


def test_the_md_config_round_trips_through_json_with_per_element_thresholds():
    cfg = MDConfig(thresholds=Thresholds(force_std_flag=0.2, per_element={"H": (0.1, None), "N": (0.3, 1.0)}))
    again = MDConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.thresholds.per_element["H"] == (0.1, None)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"stepz": 3}, r"unknown key\(s\) \['stepz'\]; allowed: \['model', "),
        ({"steps": True}, "steps must be an integer( >= 0)?, got True"),
        ({"n_samples": 1}, "n_samples must be an integer >= 2, got 1"),
        ({"uq_interval": 2.0}, "uq_interval must be an integer, got 2.0"),
        ({"thresholds": {"per_element": {"H": [0.1]}}}, r"thresholds.per_element.H must list 2 values"),
        ({"thresholds": {"force_std_flag": "high"}}, "thresholds.force_std_flag must be a finite number or null"),
    ],
)
def test_the_md_config_refuses_bad_stored_values_naming_them(data, message):
    with pytest.raises(ValueError, match=message):
        MDConfig.from_dict(data)
    if "steps" in data or "n_samples" in data:  # the same check from Python
        with pytest.raises(ValueError, match=message):
            MDConfig(**data)
