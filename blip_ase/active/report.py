"""The loop's record: ``state.json`` (rewritten atomically after every stage), ``report.csv``
(one row per round) and ``report.png``.

A row describes round ``k``: its exploration (with the model of round ``k - 1``; the test error
``test_forces_mae`` is that model's), its selection and labels, and its fine-tune (``val_*`` are
the new model's, on the validation data of all rounds so far, after calibration).
``labels_total`` counts every labelled frame the model of the next round has seen or paid for:
the starting training and validation data plus every oracle call so far (failures included).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

from blip_ase.strict_json import write_json

if TYPE_CHECKING:
    from blip_ase.active.state import LoopState

REPORT_FIELDS = (
    "round", "n_walkers", "n_checked", "n_flagged", "flagged_fraction", "n_selected", "n_labelled", "n_failed",
    "labels_total",
    "n_train_total", "n_val_total", "md_steps_completed", "md_steps_requested", "halted", "test_forces_mae",
    "val_forces_mae", "val_forces_ece", "seconds_md", "seconds_label", "seconds_train",
)  # fmt: skip


def labels_total(rows: list[dict], n_start: int) -> list[int]:
    """Cumulative labels after each round: the ``n_start`` starting frames plus every oracle call
    (labelled or failed) of the rounds so far."""
    total, out = n_start, []
    for row in rows:
        total += int(row.get("n_labelled") or 0) + int(row.get("n_failed") or 0)
        out.append(total)
    return out


def write_report(out: Path, state: LoopState) -> None:
    """Rewrite ``state.json``, ``report.csv`` and the current round's ``metrics.json``."""
    write_json(out / "state.json", state.to_dict())
    totals = labels_total(list(state.rounds), state.n_start_labels)
    rows = [row | {"labels_total": t} for row, t in zip(state.rounds, totals)]
    tmp = out / "report.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=REPORT_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in REPORT_FIELDS})
    tmp.replace(out / "report.csv")
    if rows and (out / f"round_{rows[-1]['round']}").is_dir():
        write_json(out / f"round_{rows[-1]['round']}" / "metrics.json", rows[-1])


def plot_report(out: Path, rows: list[dict], *, n_start: int = 0) -> None:
    """``report.png``: MD steps completed, labels (starting data included) and force errors per
    round; round ticks are whole numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not rows:
        return
    r = [row["round"] for row in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(r, [row["md_steps_completed"] for row in rows], "o-", label="completed")
    axes[0].plot(r, [row["md_steps_requested"] for row in rows], "k--", label="requested")
    axes[0].set(xlabel="round", ylabel="MD steps (all walkers)", title="exploration")
    axes[0].legend()
    axes[1].plot(r, labels_total(rows, n_start), "o-")
    axes[1].axhline(n_start, color="k", ls=":", label=f"starting data ({n_start})")
    axes[1].set(xlabel="round", ylabel="labelled frames (cumulative)", title="labels: start + oracle calls")
    axes[1].legend()
    for key, label in (("test_forces_mae", "test (model that explored)"), ("val_forces_mae", "validation (new model)")):
        points = [(x["round"], x[key]) for x in rows if x.get(key) is not None]
        if points:
            axes[2].plot(*zip(*points), "o-", label=label)
    axes[2].set(xlabel="round", ylabel="force MAE (eV/A)", title="errors")
    if axes[2].get_legend_handles_labels()[0]:
        axes[2].legend()
    for ax in axes:  # whole rounds only, also for a single round
        ax.set_xlim(min(r) - 0.5, max(r) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=100)
    plt.close(fig)
