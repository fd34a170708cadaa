"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s docs`, `nox -s bench`."""

import nox


nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test,examples]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install("-e", ".[lint,test,examples]")
    session.run(
        "ruff", "check", "eqpar", "tests", "examples", "benchmarks", "noxfile.py"
    )
    session.run("pyright", "eqpar")


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Runs the benchmarks side by side and appends the figures to RESULTS.md."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "benchmarks", *session.posargs)
