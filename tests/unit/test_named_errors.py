"""The named errors: each documented in docs/errors.md, errno where documented, none replaced by a bare
FlowsteerError carrying EEXIST/ENOENT that callers would have to test by errno."""

from __future__ import annotations

import errno
import inspect
import re
from pathlib import Path

from flowsteer import errors
from flowsteer.errors import AlreadyExists, FlowsteerError, NotFound

ROOT = Path(__file__).resolve().parents[2]


def test_every_error_class_is_in_the_table() -> None:
    documented = set(re.findall(r"^\| `(\w+)`", (ROOT / "docs" / "errors.md").read_text(), re.M))
    classes = {name for name, cls in inspect.getmembers(errors, inspect.isclass)
               if issubclass(cls, FlowsteerError) and cls is not FlowsteerError}
    assert classes == documented


def test_named_conditions_carry_their_errno() -> None:
    assert AlreadyExists("x").errno == errno.EEXIST
    assert AlreadyExists("x", errno=errno.EBUSY).errno == errno.EBUSY
    assert NotFound("x").errno == errno.ENOENT
    assert str(NotFound("no binding")) == "no binding: ENOENT (No such file or directory)"


def test_no_condition_is_a_bare_error_with_an_errno_to_test() -> None:
    bare = re.compile(r"FlowsteerError\([^)]*errno=errno\.(EEXIST|ENOENT|EBUSY)")
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "flowsteer").rglob("*.py")
                 if bare.search(p.read_text())]
    assert offenders == []
