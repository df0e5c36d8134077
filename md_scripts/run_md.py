#!/usr/bin/env python
"""Uncertainty-monitored NVT/NPT molecular dynamics with flagged-frame export.

The same program as ``blip md`` (same options, same defaults; ``--help`` lists them). With no
arguments it runs the shipped ammonia model (blip_ase/assets/ammonia_model.pt) from
blip_ase/assets/ammonia_nh3.xyz and writes md_out/. Examples::

    python md_scripts/run_md.py --temperature-K 1200 --steps 2000 --out md_out --overwrite
    python md_scripts/run_md.py --model mo.pt --structure cell.extxyz --ensemble npt-mtk-isotropic \\
        --temperature-K 300 --pressure-bar 1 --timestep-fs 2 --out mo_npt

Library use (what this script does underneath)::

    from blip_ase.md import MDConfig, Thresholds, run_md
    summary = run_md(MDConfig(temperature_K=1200, thresholds=Thresholds(force_std_flag=0.3)))
"""

from __future__ import annotations

import sys

from blip_ase.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["md", *sys.argv[1:]]))
