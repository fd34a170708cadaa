"""`python -m eqpar.demo`: a short tour of eqpar on simulated CPU devices.

1. A microscope: the point-spread function of 32 depth planes, the planes split
   across devices with `filter_shard_map`, imaged by a sensor that sums the planes
   locally and across devices (`sensor_sum`). Checked against one device.
2. Data-parallel training: an MLP trained with `filter_shard_map` + `grad_mean` on a
   batch that does not divide over the devices (padded, count-weighted). Checked
   against training on one device.

Run `python -m eqpar.demo --help` for the flags.
"""

import argparse
import os
import sys


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eqpar.demo", description="A short tour of eqpar."
    )
    parser.add_argument(
        "--devices", type=int, default=8, help="simulated CPU devices (default 8)"
    )
    parser.add_argument("--size", type=int, default=128, help="field size in pixels")
    parser.add_argument("--planes", type=int, default=32, help="depth planes")
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    parser.add_argument("--out", default="eqpar-demo-out", help="folder for PNGs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # Simulated devices must be configured before JAX initialises a backend.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={args.devices}"
    )
    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)

    from . import _demo_tour

    return _demo_tour.run(args)


if __name__ == "__main__":
    sys.exit(main())
