"""`python -m eqpar.demo`: the command line. Its flags (`--help` shows each default),
then the simulated CPU devices, configured before JAX starts a backend, then the
tour (`tour.py`)."""

import argparse
import os
import sys

import jax

from .tour import run


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eqpar.demo",
        description="A short tour of eqpar.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument("--size", type=int, default=128, help="field size in pixels")
    parser.add_argument("--planes", type=int, default=32, help="depth planes")
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed runs per program (medians)"
    )
    parser.add_argument(
        "--out", default="eqpar-demo-out", help="folder for the PNGs (created)"
    )
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The flags, each count at least 1 (else argparse's usage error, status 2)."""
    p = parser()
    args = p.parse_args(argv)
    for name in ("devices", "size", "planes", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # Simulated devices must be configured before JAX initialises a backend.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={args.devices}"
    )
    try:
        jax.config.update("jax_num_cpu_devices", args.devices)
    except RuntimeError:  # already started (e.g. called from a running program)
        pass
    return run(
        size=args.size,
        planes=args.planes,
        steps=args.steps,
        repeats=args.repeats,
        out=args.out,
    )


if __name__ == "__main__":
    sys.exit(main())
