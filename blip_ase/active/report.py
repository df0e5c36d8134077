"""The loop's record: ``state.json`` (rewritten atomically after every stage), ``report.csv``
(one row per round) and ``report.png``.

A row describes round ``k``: its exploration (with the model of round ``k - 1``; the test error
``test_forces_mae`` is that model's), its selection and labels, and its fine-tune (``val_*`` are
the new model's, on the validation data of all rounds so far, after calibration).
"""

from __future__ import annotations

import csv
from pathlib import Path

from blip_ase.strict_json import write_json

STAGES = ("explore", "select", "label", "train")
REPORT_FIELDS = (
    "round", "n_walkers", "n_checked", "n_flagged", "flagged_fraction", "n_selected", "n_labelled", "n_failed",
    "n_train_total", "n_val_total", "md_steps_completed", "md_steps_requested", "halted", "test_forces_mae",
    "val_forces_mae", "val_forces_ece", "seconds_md", "seconds_label", "seconds_train",
)  # fmt: skip


def read_state(out: Path) -> dict:
    """``out/state.json``.

    Raises:
        FileNotFoundError: nothing to restart from.
    """
    import json

    path = out / "state.json"
    if not path.is_file():
        raise FileNotFoundError(f"cannot restart: {path} does not exist (start without --restart)")
    return json.loads(path.read_text())


def write_report(out: Path, state: dict) -> None:
    """Rewrite ``state.json``, ``report.csv`` and the current round's ``metrics.json``."""
    write_json(out / "state.json", state)
    rows = state["rounds"]
    tmp = out / "report.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=REPORT_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in REPORT_FIELDS})
    tmp.replace(out / "report.csv")
    if rows and (out / f"round_{rows[-1]['round']}").is_dir():
        write_json(out / f"round_{rows[-1]['round']}" / "metrics.json", rows[-1])


def plot_report(out: Path, rows: list[dict]) -> None:
    """``report.png``: MD steps completed, labels spent and force errors per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    r = [row["round"] for row in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(r, [row["md_steps_completed"] for row in rows], "o-", label="completed")
    axes[0].plot(r, [row["md_steps_requested"] for row in rows], "k--", label="requested")
    axes[0].set(xlabel="round", ylabel="MD steps (all walkers)", title="exploration")
    axes[0].legend()
    spent = [sum(x.get("n_labelled", 0) + x.get("n_failed", 0) for x in rows[: i + 1]) for i in range(len(rows))]
    axes[1].plot(r, spent, "o-")
    axes[1].set(xlabel="round", ylabel="oracle calls (cumulative)", title="labels")
    for key, label in (("test_forces_mae", "test (model that explored)"), ("val_forces_mae", "validation (new model)")):
        points = [(x["round"], x[key]) for x in rows if x.get(key) is not None]
        if points:
            axes[2].plot(*zip(*points), "o-", label=label)
    axes[2].set(xlabel="round", ylabel="force MAE (eV/A)", title="errors")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=100)
    plt.close(fig)
