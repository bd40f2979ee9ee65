"""``kds-hook demo``: offline evidence on problems with a known answer (placeholder until the demo lands)."""

from __future__ import annotations

import argparse


def register(commands) -> None:
    parser = commands.add_parser("demo", help="run the offline demo")
    parser.add_argument("--out", default="kds-demo", help="output directory (default ./kds-demo)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import torch

    from .. import KDS

    kds = KDS(num_particles=10, bandwidth="auto", record=True)
    x0 = torch.randn(20, 4, 8, 8)
    steered = kds.steer_x0(x0, t_frac=0.5)
    print(f"steered 2 items x 10 particles: mean |shift| = {(steered - x0).abs().mean():.4f}, "
          f"self-weight = {kds.history[-1].self_weight:.3f}")
    return 0
