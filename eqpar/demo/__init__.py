"""`python -m eqpar.demo`: a short tour of eqpar on simulated CPU devices.

1. A microscope: the point-spread function of 32 depth planes, the planes split
   across devices with `filter_shard_map`, imaging a test object (point beads, each
   at its own depth) with a sensor that sums the planes locally and across devices
   (`sensor_sum`). Checked against one device; drawn in `OUT/microscope.png`.
2. Data-parallel training: an MLP trained with `filter_shard_map` +
   `filter_value_and_grad_mean` on a batch that does not divide over the devices
   (padded, count-weighted). Checked against training on one device; both loss
   curves in `OUT/training.png`.

The summary table gives each program's largest difference from one device and its
median time over repeats (after compilation). Simulated CPU devices share the
machine's cores: they show that the results equal one device's, not a speedup.

Run `python -m eqpar.demo --help` for the flags. `import eqpar` never imports this
package, and this `__init__` imports nothing, so that `eqpar.demo.optics` (the
optical model, shared with `examples/microscope.py` and the benchmarks) comes alone.
The files are listed in README.md.
"""
