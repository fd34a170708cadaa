"""eqpar's benchmark suite: each benchmark side by side with its baseline, in one
process, with goals marked met / NOT met.

    python -m benchmarks [names...] [--quick]      # or: nox -s bench [-- --quick]

Each benchmark is a module here with `run(quick: bool) -> _common.Result`; the
runner (`__main__.py`) prints the markdown, appends it to `RESULTS.md` and draws
`<name>.png` next to it.
"""

BENCHMARKS = (
    "dispatch",
    "scaling",
    "memory",
    "sharding",
    "chunking",
    "training",
    "pipeline",
    "fft",
    "deep",
)
"""Registered benchmarks, in the order the runner runs them."""
