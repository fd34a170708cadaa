"""The code in the docs runs: every ```python block of each docs page (a page's
blocks run in order, in one namespace, like a notebook) and every ```python block in
the docstrings of eqpar's public names. Blocks fenced as ```py are illustrations
(e.g. needing several processes) and are not run.

Every page and every public name has at least one such block: a test over a page or
a name without one fails, rather than passing with nothing checked. The API
reference pages (docs/api/) are made of `::: eqpar.name` directives, which render
the names' docstrings: their examples are the docstrings' own."""

import inspect
import pathlib
import re
import textwrap

import jax
import pytest

import eqpar


DOCS = pathlib.Path(__file__).parent.parent / "docs"
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<body>.*?)^(?P=indent)```",
    re.DOTALL | re.MULTILINE,
)


def blocks(text: str) -> list[str]:
    """Each block's code, preceded by blank lines so that a traceback gives the
    line in the page (or docstring) it came from."""
    return [
        "\n" * text.count("\n", 0, m.start("body")) + textwrap.dedent(m.group("body"))
        for m in FENCE.finditer(text)
    ]


API = DOCS / "api"
PAGES = sorted(p for p in DOCS.rglob("*.md") if API not in p.parents)
API_PAGES = sorted(API.glob("*.md"))
DIRECTIVE = re.compile(r"^::: (eqpar\.[\w.]+)\s*$", re.MULTILINE)
# Public submodules whose functions are public names too (`eqpar.fft.fftn`): listed,
# not discovered, so that every pytest-xdist worker collects the same tests.
SUBMODULES = ("fft",)


def resolve(name: str):
    obj = eqpar
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


PUBLIC = sorted(
    name
    for name in dir(eqpar)
    if not name.startswith("_")
    and getattr(eqpar, name).__doc__
    and not inspect.ismodule(getattr(eqpar, name))
) + sorted(
    f"{module}.{name}"
    for module in SUBMODULES
    for name, obj in vars(resolve(module)).items()
    if not name.startswith("_")
    and inspect.isfunction(obj)
    and obj.__module__ == f"eqpar.{module}"
)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_code_runs(page, tmp_path, monkeypatch):
    """A page is user code: it runs under JAX's own defaults (standard dtype
    promotion, rank promotion allowed), not the strict settings of tests/conftest.py,
    so that it needs nothing a reader would not write. (Its first block may set the
    device count, `jax.config.update("jax_num_cpu_devices", 8)`: the 8 devices the
    tests already have, which JAX accepts again.)"""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    codes = blocks(page.read_text())
    assert codes, f"{page.relative_to(DOCS)} has no ```python example"
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        for code in codes:
            exec(compile(code, str(page), "exec"), namespace)


@pytest.mark.parametrize("name", PUBLIC)
def test_docstring_examples_run(name):
    doc = inspect.getdoc(resolve(name)) or ""
    codes = blocks(doc)
    assert codes, f"eqpar.{name}'s docstring has no ```python example"
    for code in codes:
        exec(compile(code, f"eqpar.{name}", "exec"), {"__name__": f"doc_{name}"})


def test_public_names_are_documented():
    undocumented = [
        n
        for n in dir(eqpar)
        if not n.startswith("_")
        and not inspect.ismodule(getattr(eqpar, n))
        and not (getattr(eqpar, n).__doc__ or "").strip()
    ]
    assert not undocumented
    api = "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
    missing = [n for n in PUBLIC if f"eqpar.{n}" not in api]
    assert not missing, f"not in the API reference: {missing}"


@pytest.mark.parametrize("page", API_PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_api_pages_are_references(page):
    """An API page is headings, prose and `::: eqpar.name` directives: its examples
    are the named objects' docstrings, each run above (a public name) or by its
    owner's page (a member such as a method)."""
    text = page.read_text()
    names = DIRECTIVE.findall(text)
    assert names, f"{page.relative_to(DOCS)} references nothing"
    assert not blocks(text), "API pages hold directives; examples go in docstrings"
    for name in names:
        obj = resolve(name.removeprefix("eqpar."))  # it names something that exists
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert name.removeprefix("eqpar.") in PUBLIC
