"""The compile-and-cache core shared by every compiling transform (see README.md)."""

from ._compiled import Backend as Backend, Compiled as Compiled, Lowered as Lowered
from ._program import check_donate as check_donate, Donate as Donate
from ._tables import Bounded as Bounded
from ._wrapper import (
    decorator_or_call as decorator_or_call,
    shared as shared,
    Transformed as Transformed,
    transformed as transformed,
)
