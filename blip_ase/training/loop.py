"""The training loop behind ``blip train``: ELBO with one Monte Carlo sample per step (``loss.nll_samples``
with the variance scoring rule ``loss.nll_weight``)."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from blip_ase.bayes import NoiseSource
from blip_ase.data.dataset import Batch, GraphDataset
from blip_ase.data.readers import read_frames
from blip_ase.devices import resolve_device
from blip_ase.models.checkpoint import load_checkpoint, save_checkpoint
from blip_ase.models.potential import BACKENDS, Potential
from blip_ase.training import distributed
from blip_ase.training.averaging import WeightAverage
from blip_ase.training.config import TrainConfig
from blip_ase.training.contrastive import DisplacementModes, contrastive_kl, displacement_modes
from blip_ase.training.loss import elbo_loss, variance_nll

LOG_FIELDS = ["epoch", "lr", "train_loss", "train_energy", "train_forces", "train_kl", "train_kl_contrastive",
              "train_nll", "val_loss", "val_energy_mae", "val_forces_mae", "val_mc_nll", "seconds"]


def build_model(cfg: TrainConfig, elements: list[int]) -> Potential:
    """Fresh model for ``cfg`` (seeded by the caller); an ORB model reads its base weights file."""
    if cfg.backend not in BACKENDS:
        raise ValueError(f"unknown backend {cfg.backend!r}; known: {sorted(BACKENDS)}")
    arch = getattr(cfg, cfg.backend)  # the config section named like the backend
    return BACKENDS[cfg.backend](elements, arch, None if cfg.deterministic else cfg.bayes)


def fit_normalisation(model: Potential, data: GraphDataset) -> None:
    """Data-dependent constants of the model from the training set (see the backend's
    ``fit_normalisation``: PaiNN fits reference energies and the force scale; ORB keeps a
    pretrained model's frozen statistics)."""
    energies = np.array([lab["energy"] for lab in data.labels])
    forces = np.concatenate([lab["forces"] for lab in data.labels])
    model.fit_normalisation(data.frames, energies, forces)


def make_optimizer(model: Potential, cfg: TrainConfig) -> torch.optim.Optimizer:
    posterior = list(model.posterior.parameters()) if getattr(model, "posterior", None) is not None else []
    ids = {id(p) for p in posterior}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids], "lr": cfg.optim.lr}]
    if posterior:
        groups.append({"params": posterior, "lr": cfg.optim.posterior_lr or cfg.optim.lr})
    opt_cls = torch.optim.AdamW if cfg.optim.optimizer == "adamw" else torch.optim.Adam
    return opt_cls(groups, weight_decay=cfg.optim.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """Returns ``(scheduler, per_step)``; per-epoch plateau schedulers step on validation loss."""
    o = cfg.optim
    if o.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=o.plateau_factor, patience=o.plateau_patience), False
    if o.scheduler == "cosine":
        warmup = max(1, int(o.warmup_fraction * total_steps))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), True
    return None, False


def evaluate_map(model: Potential, data: GraphDataset, cfg: TrainConfig, device, dtype) -> dict[str, float]:
    """MAP-mode validation loss (data terms only) and energy/force MAE (eV, eV/A). In distributed
    training each rank evaluates its share of the batches and the sums are added over ranks."""
    sums = np.zeros(5)  # loss * structures, |dE|, |dF|, structures, force components
    for indices in distributed.own(data.batch_indices(cfg.batch_size)):
        batch = data.batch(indices).to(device, dtype)
        out = {k: v.detach() for k, v in model(batch.graph, compute_stress=data.use_stress).items()}
        loss, _ = elbo_loss(out, batch, cfg.loss)
        g = batch.graph.n_graphs
        sums += [float(loss) * g, float((out["energy"][0] - batch.energy).abs().sum()),
                 float((out["forces"][0] - batch.forces).abs().sum()), g, batch.forces.numel()]  # fmt: skip
    loss, energy, forces, n_e, n_f = distributed.all_sum(sums)
    return {"loss": loss / n_e, "energy_mae": energy / n_e, "forces_mae": forces / n_f}


def kl_factor(epoch: int, warmup_epochs: int) -> float:
    """Multiplier of the KL weights in ``epoch`` (0-based): linear from ``1/warmup`` to 1."""
    return min(1.0, (epoch + 1) / warmup_epochs) if warmup_epochs > 0 else 1.0


def evaluate_mc_nll(model: Potential, data: GraphDataset, cfg: TrainConfig, device, dtype) -> float:
    """Gaussian NLL (nats per force component) of ``data`` under ``cfg.select_samples`` Monte
    Carlo samples with seeds ``0 .. S-1`` (the same draws at every call), with the variances
    multiplied by the NLL-optimal scale ``mean(err^2 / var)``: ``0.5 mean(log(2 pi s var)) + 0.5``.
    Component variance: the atom's variance trace / 3, as in :mod:`blip_ase.uq.metrics`."""
    sums = np.zeros(3)  # err^2 / var, log var, force components (added over ranks)
    for indices in distributed.own(data.batch_indices(cfg.batch_size)):
        batch = data.batch(indices).to(device, dtype)
        coefficients = model.coefficients(batch.graph)
        noise = NoiseSource.from_seeds(list(range(cfg.select_samples)), device)
        forces = model(batch.graph, coefficients=coefficients, noise=noise)["forces"].detach().double()
        err2 = ((forces.mean(0) - batch.forces.double()) ** 2).flatten()
        v = (forces.var(0).sum(-1, keepdim=True).expand(-1, 3) / 3.0).flatten().clamp_min(1e-12)
        sums += [float((err2 / v).sum()), float(torch.log(v).sum()), v.numel()]
    ratio, log_var, n = distributed.all_sum(sums)
    with np.errstate(divide="ignore"):
        nll = float(0.5 * (np.log(2 * math.pi * ratio / n) + log_var / n) + 0.5)
    if not math.isfinite(nll):
        raise ValueError(f"the Monte Carlo validation NLL is {nll}: the model predicts non-finite forces")
    return nll


def train_step(
    model, batch: Batch, cfg: TrainConfig, optimizer, generator, use_stress: bool,
    *, kl_factor: float = 1.0, contrastive_generator: torch.Generator | None = None,
    forward: torch.nn.Module | None = None, contrastive_modes: DisplacementModes | None = None,
) -> dict[str, float]:  # fmt: skip
    """One optimiser step on ``batch`` with one Monte Carlo sample from ``generator`` (with
    ``cfg.loss.nll_weight``: ``cfg.loss.nll_samples`` samples and the variance scoring rule
    :func:`~blip_ase.training.loss.variance_nll`); the KL weights are multiplied by ``kl_factor``
    (warm-up); with ``cfg.contrastive.weight`` the KL of perturbed copies (drawn from
    ``contrastive_generator``; for ``kind: modes`` along ``contrastive_modes``) is added.

    In distributed training ``batch`` is this rank's part of the global batch, ``forward`` the
    DistributedDataParallel wrapper of ``model`` (:func:`~blip_ase.training.distributed.wrap`),
    and every mean of the loss is over the global batch (the logged parts are this rank's shares:
    their average over ranks is the global value)."""
    coefficients = model.coefficients(batch.graph)
    share = distributed.batch_share(batch, coefficients)
    scored = bool(cfg.loss.nll_weight) and coefficients is not None
    noise = NoiseSource([generator] * (cfg.loss.nll_samples if scored else 1)) if coefficients is not None else None
    # The variance scoring rule trains the inference network only (the potential learns from the
    # ELBO), by a backward pass of its own, which DDP's hooks would take for the step's; so with
    # the rule the model is not wrapped (distributed.wrap(..., reduce=False)) and the ranks'
    # gradients are averaged by hand after the ELBO's backward.
    if scored and isinstance(forward, torch.nn.parallel.DistributedDataParallel):
        raise ValueError("loss.nll_weight > 0: wrap the model with distributed.wrap(model, reduce=False)")
    out = (forward or model)(
        batch.graph, coefficients=coefficients, noise=noise, compute_stress=use_stress, create_graph=True
    )
    bayes = model.bayes
    p0 = bayes.p0 if bayes else 0.5
    kl_weight = kl_factor * bayes.kl_weight if bayes else 0.0
    loss, parts = elbo_loss(out, batch, cfg.loss, coefficients=coefficients, p0=p0, kl_weight=kl_weight, share=share)
    scoring = []  # (parameter, gradient) of the variance scoring rule
    if scored:
        term, parts["nll"] = variance_nll(out["forces"], batch.forces, share=share, reduce=distributed.all_sum)
        posterior = [p for p in model.posterior.parameters() if p.requires_grad]
        grads = torch.autograd.grad(
            cfg.loss.nll_weight * term, posterior, retain_graph=True, allow_unused=True, materialize_grads=True
        )
        scoring = list(zip(posterior, grads))
    if cfg.contrastive.weight and getattr(model, "posterior", None) is not None:
        if contrastive_generator is None:
            raise ValueError("contrastive.weight > 0 needs a contrastive_generator for the perturbations")
        weights = (share.edges, share.nodes)
        kl_c = contrastive_kl(
            model, batch.graph, cfg.contrastive, contrastive_generator, p0, weights=weights, modes=contrastive_modes
        )
        loss = loss + kl_factor * cfg.contrastive.weight * kl_c
        parts["kl_contrastive"] = float(kl_c.detach())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for p, g in scoring:
        p.grad = g if p.grad is None else p.grad + g
    if scored:
        distributed.average([p.grad for p in model.parameters() if p.grad is not None])
    if cfg.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    optimizer.step()
    return {"loss": float(loss.detach()), **parts}


def _load(path: str | Path, model: Potential, use_stress: bool, name: str) -> GraphDataset:
    return model.make_dataset(read_frames(path), use_stress=use_stress, name=name)


def initial_model(init_checkpoint: str | Path, *, member: int = 0, members: int = 1) -> Potential:
    """A fresh copy of the model training starts from (fine-tuning).

    Args:
        init_checkpoint: a single model's checkpoint (every member starts from it), or an
            ensemble checkpoint with ``members`` members (member ``k`` starts from its member ``k``).
        member: which member of the ensemble being trained this copy is for.
        members: the size of the ensemble being trained (1: a single model).

    Raises:
        ValueError: an ensemble checkpoint whose number of members is not ``members``.
    """
    model = load_checkpoint(init_checkpoint)[0]
    if model.backend != "ensemble":
        return model
    n = len(model.members)
    if n != members:
        wanted = "a single model" if members == 1 else f"an ensemble of {members}"
        raise ValueError(
            f"init_checkpoint {init_checkpoint} is an ensemble of {n} members, but the config trains {wanted}: "
            f"set ensemble: {n} (member k starts from member k), or start from one member's checkpoint"
        )
    return model.members[member]


def train_model(
    cfg: TrainConfig, train_path: str | Path, val_path: str | Path, out_dir: str | Path, *, overwrite: bool = False,
    init_model: Potential | None = None,
) -> dict:  # fmt: skip
    """Train one model and write ``out_dir/model.pt`` (the epoch chosen by ``cfg.select_by``) and
    ``out_dir/log.csv``. Under torchrun, one model across the processes
    (:mod:`blip_ase.training.distributed`); rank 0 writes the files. :func:`blip_ase.training.train`
    is the entry point that also trains ensembles.

    With ``init_model`` (see :func:`initial_model`; it is trained in place) training fine-tunes
    that model: its architecture, elements and normalisation are kept, and ``cfg``'s
    architecture sections are ignored.

    Returns:
        Summary: best epoch, validation metrics of the best checkpoint (MAP), wall time.

    Raises:
        FileExistsError: ``out_dir/model.pt`` exists and ``overwrite`` is False.
        ValueError: ``cfg.ensemble`` is not 1, bad data (missing labels, unknown elements, NaN
            positions) or config, or a ``batch_size`` that is not a multiple of the number of processes.
    """
    if cfg.ensemble != 1:
        raise ValueError(f"train_model trains one model, but ensemble is {cfg.ensemble}; use blip_ase.training.train")
    out_dir = Path(out_dir)
    ckpt_path = out_dir / "model.pt"
    if ckpt_path.exists() and not overwrite:
        raise FileExistsError(f"{ckpt_path} exists; pass --overwrite to replace it")
    device, dtype = distributed.start(resolve_device(cfg.device)), getattr(torch, cfg.dtype)
    distributed.check_batch_size(cfg.batch_size, distributed.world_size())
    use_stress = cfg.loss.stress_weight > 0
    train_frames = read_frames(train_path)
    if init_model is not None:
        model = init_model
    else:
        elements = cfg.elements or sorted({int(z) for a in train_frames for z in a.numbers})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = build_model(cfg, elements)
    train_data = model.make_dataset(train_frames, use_stress=use_stress, name=str(train_path))
    val_data = _load(val_path, model, use_stress, str(val_path))
    if init_model is None:
        fit_normalisation(model, train_data)
    model.to(device=device, dtype=dtype)
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
    scheduler, per_step = make_scheduler(optimizer, cfg, cfg.epochs * steps_per_epoch)
    rng, rank = np.random.default_rng(cfg.seed), distributed.rank()  # the same order on every rank
    generators = (
        torch.Generator(device=device).manual_seed(distributed.rank_seed(cfg.seed, rank)),
        torch.Generator(device=device).manual_seed(distributed.rank_seed(cfg.contrastive.seed + cfg.seed, rank)),
    )
    modes = None
    if cfg.contrastive.kind == "modes" and cfg.contrastive.weight:
        modes = displacement_modes(train_frames, model.elements)
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
    return _fit(model, cfg, train_data, val_data, optimizer, scheduler, per_step, rng, (*generators, modes), out_dir,
                device, dtype)  # fmt: skip


def _fit(model, cfg, train_data, val_data, optimizer, scheduler, per_step, rng, generators, out_dir, device, dtype) -> dict:
    from tqdm.auto import tqdm

    generator, contrastive_generator, modes = generators  # modes: for contrastive kind "modes", else None
    select_mc = cfg.select_by == "mc_nll" and model.is_bayesian
    start, best, best_epoch, stale = time.perf_counter(), math.inf, -1, 0
    best_metrics: dict[str, float] = {}
    main, n = distributed.is_main(), distributed.world_size()
    forward = distributed.wrap(model, reduce=not cfg.loss.nll_weight)  # loss.nll_weight: by hand (train_step)
    shard = (distributed.rank(), n)
    ema = WeightAverage(model, cfg.optim.ema_decay) if cfg.optim.ema_decay is not None else None
    with open(out_dir / "log.csv" if main else os.devnull, "w", newline="") as fh:
        log = csv.DictWriter(fh, fieldnames=LOG_FIELDS)
        log.writeheader()
        bar = tqdm(range(cfg.epochs), desc="train", disable=not (cfg.progress and main), dynamic_ncols=True)
        for epoch in bar:
            model.train()
            parts = []
            factor = kl_factor(epoch, cfg.kl_warmup_epochs)
            for batch in train_data.batches(cfg.batch_size, shuffle=True, rng=rng, shard=shard):
                parts.append(train_step(
                    model, batch.to(device, dtype), cfg, optimizer, generator, train_data.use_stress,
                    kl_factor=factor, contrastive_generator=contrastive_generator, forward=forward,
                    contrastive_modes=modes,
                ))  # fmt: skip
                if ema is not None:
                    ema.update(model)
                if per_step:
                    scheduler.step()
            model.eval()
            # validation, selection and the checkpoint use the averaged weights (optim.ema_decay)
            with ema.swapped(model) if ema is not None else contextlib.nullcontext():
                val = evaluate_map(model, val_data, cfg, device, dtype)
                if select_mc:
                    val["mc_nll"] = evaluate_mc_nll(model, val_data, cfg, device, dtype)
                if scheduler is not None and not per_step:
                    scheduler.step(val["loss"])
                names = ("loss", "energy", "forces", "kl", "kl_contrastive", "nll")
                means = distributed.all_sum([np.mean([p.get(k, 0.0) for p in parts]) / n for k in names])  # over ranks
                row = {
                    "epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                    **{f"train_{k}": v for k, v in zip(names, means)},
                    "val_loss": val["loss"], "val_energy_mae": val["energy_mae"], "val_forces_mae": val["forces_mae"],
                    "val_mc_nll": val.get("mc_nll", ""), "seconds": time.perf_counter() - start,
                }
                log.writerow(row)
                fh.flush()
                bar.set_postfix(loss=f"{row['train_loss']:.4f}", val_F_mae=f"{val['forces_mae']:.4f}")
                score = val["mc_nll"] if select_mc else val["loss"]
                if score < best:
                    best, best_epoch, stale, best_metrics = score, epoch, 0, val
                    meta = {"epoch": epoch, "val": val, "config": dataclasses.asdict(cfg), "seconds": row["seconds"],
                            "processes": distributed.world_size()}
                    if main:
                        save_checkpoint(out_dir / "model.pt", model, training=meta)
                else:
                    stale += 1
            if cfg.optim.early_stopping_patience is not None and stale >= cfg.optim.early_stopping_patience:
                break
    wall = time.perf_counter() - start
    return {"best_epoch": best_epoch, "epochs_run": epoch + 1, "val": best_metrics, "seconds": wall,
            "checkpoint": str(out_dir / "model.pt")}
