"""Split ammonia.extxyz into train/val (near-equilibrium, seeded) and ood files.

    python examples/ammonia/make_splits.py

The 87 frames with ``split=train`` (<= 5 kcal/mol above the minimum) are shuffled with seed 0
into 70 training and 17 validation frames; the 51 ``split=ood`` frames form ood.extxyz.
"""

from pathlib import Path

import numpy as np
from ase.io import read, write

here = Path(__file__).parent
frames = read(here / "ammonia.extxyz", ":")
near = [a for a in frames if a.info["split"] == "train"]
ood = [a for a in frames if a.info["split"] == "ood"]
order = np.random.default_rng(0).permutation(len(near))
write(here / "train.extxyz", [near[k] for k in order[:70]], format="extxyz")
write(here / "val.extxyz", [near[k] for k in order[70:]], format="extxyz")
write(here / "ood.extxyz", ood, format="extxyz")
print(f"train {70}, val {len(near) - 70}, ood {len(ood)}")
