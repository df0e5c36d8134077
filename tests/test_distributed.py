"""Distributed data-parallel training: 2 gloo processes on CPU, started by torchrun.

Every run goes through ``_run`` with a timeout, so a rank that waits for a dead peer fails the
test instead of hanging CI. The processes import the worktree's ``blip_ase`` (``PYTHONPATH``).
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.io import read
from torch.utils.data import DistributedSampler

from blip_ase import BLIPCalculator
from blip_ase.bayes import Coefficients, NoiseSource, kl_divergence
from blip_ase.cli.main import main as blip
from blip_ase.models import load_checkpoint
from blip_ase.training import distributed, load_config
from blip_ase.training.loop import evaluate_map, evaluate_mc_nll
from blip_ase.training.contrastive import perturb_edge_vectors
from blip_ase.training.loss import elbo_loss, variance_nll
from ddp_worker import GLOBAL_BATCH, KINDS, generators, setup, sgd_step

ROOT = Path(__file__).resolve().parents[1]
AMMONIA = ROOT / "examples" / "ammonia"
WORKER = Path(__file__).with_name("ddp_worker.py")
TIMEOUT_S = 180
CONFIG = """
painn: {n_features: 8, n_interactions: 2, n_rbf: 6, cutoff: 4.0}
bayes: {p0: 0.5, kl_weight: 1.0, p_init: 0.2, hidden: 8, n_hidden: 1, n_rbf: 6}
contrastive: {weight: 0.01}
optim: {lr: 3.0e-3}
epochs: 2
batch_size: 8
seed: 5
progress: false
select_by: mc_nll
"""


def _run(args: list[str], timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """``python ARGS`` in its own process group, killed with all its children after ``timeout``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.Popen([sys.executable, *args], env=env, text=True, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        try:  # a worker in a session of its own may outlive the group and hold the pipes open
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        pytest.fail(f"python {' '.join(args)} did not finish within {timeout} s")
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    return _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args])


def _train_args(tmp: Path, out: str) -> list[str]:
    (tmp / "config.yaml").write_text(CONFIG)
    return [str(tmp / "config.yaml"), "--train", str(AMMONIA / "train.extxyz"), "--val", str(AMMONIA / "val.extxyz"),
            "--out", str(tmp / out)]  # fmt: skip


@pytest.fixture(scope="module")
def ddp_step(tmp_path_factory) -> Path:
    """``ddp_worker.py step`` on 2 ranks: each rank's gradients and parameters after one step,
    and ``OUT/run``, a short ``blip train`` run."""
    out = tmp_path_factory.mktemp("ddp_step")
    result = _torchrun([str(WORKER), "step", str(out), *_train_args(out, "run")])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _global_step_reference(kind: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The single-process step on the same global batch. BLIP draws one noise sample per step
    (``blip_nll``: two) from one generator, so the reference evaluates each rank's half of the batch with that rank's
    generator (the same noise) and takes the single-process ELBO of the concatenated outputs: all
    means, the KL's included, over the global batch; the contrastive KL likewise, of each half's
    copy perturbed by that rank's generator. Also returns the gradient of the mean of
    the two halves' own losses (what plain DDP averaging would give), which must differ."""
    cfg, model, data = setup(kind)
    halves = [next(data.batch_indices(GLOBAL_BATCH, shard=(r, 2))) for r in range(2)]
    batch = data.batch(np.concatenate(halves)).to("cpu", torch.float64)
    naive = _naive_gradient(cfg, *setup(kind)[1:], halves)
    if kind == "deterministic":
        sgd_step(model, batch, cfg, 0)
        return model, naive
    outs, alphas, betas, perturbed = [], [], [], []
    samples = cfg.loss.nll_samples if cfg.loss.nll_weight else 1
    for rank, indices in enumerate(halves):
        graph = data.batch(indices).to("cpu", torch.float64).graph
        c = model.coefficients(graph)
        generator, contrastive_generator = generators(cfg, rank)
        outs.append(model(graph, coefficients=c, noise=NoiseSource([generator] * samples), create_graph=True))
        alphas.append(c.edge), betas.append(c.node)
        x = model.posterior_inputs(graph)  # the rank's perturbed copy of its half
        c = model.posterior(x.species, x.edge_index, perturb_edge_vectors(x, cfg.contrastive, contrastive_generator))
        perturbed.append((c.edge, c.node if model.posterior.neighbourhood else c.node[:, :0]))
    out = {key: torch.cat([o[key] for o in outs], dim=1) for key in ("energy", "forces")}
    coefficients = Coefficients(torch.cat(alphas), torch.cat(betas))
    loss, _ = elbo_loss(out, batch, cfg.loss, coefficients=coefficients, p0=cfg.bayes.p0, kl_weight=cfg.bayes.kl_weight)
    copies = Coefficients(*(torch.cat(blocks) for blocks in zip(*perturbed)))
    loss = loss + cfg.contrastive.weight * kl_divergence(copies, cfg.bayes.p0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scoring = []  # the variance scoring rule over the global batch, on the inference network only
    if cfg.loss.nll_weight:
        posterior = list(model.posterior.parameters())
        term, _ = variance_nll(out["forces"], batch.forces)
        scoring = zip(posterior, torch.autograd.grad(cfg.loss.nll_weight * term, posterior, retain_graph=True))
    loss.backward()
    for p, g in scoring:
        p.grad += g
    optimizer.step()
    return model, naive


def _naive_gradient(cfg, model, data, halves) -> dict[str, torch.Tensor]:
    """Mean over the halves of each half's own single-process gradient."""
    grads = []
    for rank, indices in enumerate(halves):
        sgd_step(model, data.batch(indices).to("cpu", torch.float64), cfg, rank)
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    return {name: 0.5 * (grads[0][name] + grads[1][name]) for name in grads[0]}


@pytest.mark.parametrize("kind", KINDS)
def test_one_ddp_step_on_two_ranks_equals_one_single_process_step_on_the_global_batch(ddp_step, kind):
    """ORB v3 has parameters that get no gradient (its decoder, confidence and reference-energy
    heads): they keep none under DDP too, and the others are still averaged."""
    model, naive = _global_step_reference(kind)
    ranks = [torch.load(ddp_step / f"{kind}_rank{r}.pt", weights_only=True) for r in range(2)]
    grads = {name: p.grad for name, p in model.named_parameters()}
    for rank in ranks:
        assert {k for k, g in rank["grads"].items() if g is None} == {k for k, g in grads.items() if g is None}
        for name, g in grads.items():
            if g is not None:
                torch.testing.assert_close(rank["grads"][name], g, rtol=1e-9, atol=1e-12, msg=name)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(rank["params"][name], value, rtol=1e-9, atol=1e-12, msg=name)
    # the halves hold different numbers of atoms and edges: local means would give another gradient
    differs = [not torch.allclose(naive[name], grads[name], rtol=1e-6, atol=1e-9) for name in naive]
    assert sum(differs) > len(differs) // 2


def test_blip_train_nproc_2_writes_one_checkpoint_that_loads_and_evaluates(tmp_path, ddp_step):
    result = _run(["-m", "blip_ase.cli.main", "train", *_train_args(tmp_path, "run"), "--nproc", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('"checkpoint"') == 1  # one summary: rank 0 prints
    with open(tmp_path / "run" / "log.csv") as fh:
        assert [row["epoch"] for row in csv.DictReader(fh)] == ["0", "1"]  # rank 0 writes, once
    model, ckpt = load_checkpoint(tmp_path / "run" / "model.pt")
    assert ckpt["training"]["processes"] == 2
    # validation was reduced over ranks: it equals the single-process evaluation of the checkpoint
    cfg = load_config(tmp_path / "config.yaml")
    val_data = model.make_dataset(read(AMMONIA / "val.extxyz", ":"))
    val = evaluate_map(model, val_data, cfg, "cpu", torch.float32)
    val["mc_nll"] = evaluate_mc_nll(model, val_data, cfg, "cpu", torch.float32)
    for key, value in val.items():
        assert ckpt["training"]["val"][key] == pytest.approx(value, rel=1e-9)
    atoms = read(AMMONIA / "val.extxyz", 0)
    atoms.calc = BLIPCalculator.from_checkpoint(tmp_path / "run" / "model.pt", n_samples=4, seed=0)
    assert np.isfinite(atoms.get_forces()).all() and np.isfinite(atoms.calc.results["forces_variance"]).all()
    # the same seed and the same number of processes give the same model (the fixture's run)
    state = load_checkpoint(ddp_step / "run" / "model.pt")[0].state_dict()
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())


def test_a_crash_on_one_rank_stops_every_rank_with_an_error_naming_the_rank(tmp_path):
    result = _torchrun([str(WORKER), "crash", *_train_args(tmp_path, "run")])
    assert result.returncode != 0
    assert "RuntimeError: injected failure in the first training step on rank 1" in result.stderr
    # torchrun's report names the failed rank and the rank it stopped
    assert re.search(r"Root Cause[^\n]*\n\[0\]:\n.*\n.*\n\s*rank\s*: 1 \(local_rank: 1\)", result.stderr)
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)\n\s*exitcode\s*: -15 .*SIGTERM", result.stderr)
    assert not (tmp_path / "run" / "model.pt").exists()


def test_each_rank_takes_its_share_of_every_single_process_batch_padded_like_distributed_sampler():
    _, _, data = setup("deterministic")  # 8 structures
    whole = [list(b) for b in data.batch_indices(6, shuffle=True, rng=np.random.default_rng(1))]
    shards = [[list(b) for b in data.batch_indices(6, shuffle=True, rng=np.random.default_rng(1), shard=(r, 3))]
              for r in range(3)]  # fmt: skip
    assert all([len(b) for b in s] == [2, 1] for s in shards)  # the same steps, equal shares, on every rank
    first, second = ([i for s in shards for i in s[k]] for k in (0, 1))
    assert sorted(first) == sorted(whole[0])
    assert sorted(second) == sorted(whole[1] + whole[0][:1])  # 8 -> 9 structures: the first one again
    # rank r's batches are DistributedSampler's shard of the epoch's order, cut into batch_size / N
    order = np.random.default_rng(1).permutation(len(data))
    for r, shard in enumerate(shards):
        sampler = DistributedSampler(order, num_replicas=3, rank=r, shuffle=False)
        assert shard == [list(order[list(sampler)][k : k + 2]) for k in (0, 2)]


@pytest.mark.parametrize(("nproc", "message"), [
    ("0", "--nproc must be >= 1, got 0"),
    ("3", "batch_size 8 is the global batch and must be a multiple of the number of processes, 3"),
])  # fmt: skip
def test_nonsense_nproc_is_refused_before_any_process_starts(tmp_path, capsys, nproc, message):
    assert blip(["train", *_train_args(tmp_path, "run"), "--nproc", nproc]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_rank_other_than_0_writes_no_file_and_prints_nothing(tmp_path, monkeypatch, capsys):
    """What rank 1 does, in one process: the same training with every write and print left to rank 0."""
    args = _train_args(tmp_path, "run")
    (tmp_path / "config.yaml").write_text(CONFIG.replace("progress: false", "progress: true"))
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    assert blip(["train", *args, "--epochs", "1"]) == 0
    assert not (tmp_path / "run").exists()  # no model.pt, no log.csv
    out, err = capsys.readouterr()
    assert out == "" and "train" not in err  # no summary, no progress bar


def test_nproc_under_torchrun_a_missing_data_file_and_an_existing_checkpoint_are_refused_before_torchrun(
    tmp_path, capsys, monkeypatch
):
    args = _train_args(tmp_path, "run")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert blip(["train", *args, "--nproc", "1"]) == 2
    assert "already runs under torchrun; leave --nproc out" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    missing = [*args[:2], str(tmp_path / "nothing.extxyz"), *args[3:]]
    assert blip(["train", *missing, "--nproc", "2"]) == 2
    missing_error = f"blip train: error: data file {tmp_path / 'nothing.extxyz'} does not exist"
    assert capsys.readouterr().err.strip() == missing_error
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_text("")
    assert blip(["train", *args, "--nproc", "2"]) == 2
    exists_error = f"blip train: error: {tmp_path / 'run' / 'model.pt'} exists; pass --overwrite to replace it"
    assert capsys.readouterr().err.strip() == exists_error


def test_more_processes_than_gpus_is_refused_before_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for device in (["--device", "cuda"], []):  # the config's device is None: CUDA when there is a GPU
        assert blip(["train", *_train_args(tmp_path, "run"), "--nproc", "2", *device]) == 2
        assert capsys.readouterr().err.strip() == (
            "blip train: error: --nproc 2 on CUDA needs one GPU per process; this machine has 1 "
            "(--device cpu trains on CPU processes)"
        )
