"""`python -m benchmarks [--calls N --rounds R --devices D]`: every benchmark, appended
to benchmarks/RESULTS.md."""

import pathlib
import sys

from . import dispatch


def main() -> None:
    report = dispatch.main(sys.argv[1:])
    results = pathlib.Path(__file__).with_name("RESULTS.md")
    with results.open("a") as f:
        f.write("\n" + report)
    print(f"appended to {results}")


if __name__ == "__main__":
    main()
