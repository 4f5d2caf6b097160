"""Exact messages, classes and attributes of flowsteer's errors, and the one whole-number reader."""

from __future__ import annotations

import errno

import pytest

from flowsteer.errors import FlowsteerError, InvalidInput, KernelError, PermissionDenied, kernel_error
from flowsteer.numbers import counted, is_whole_number


def test_an_error_without_errno_is_its_message() -> None:
    err = InvalidInput("port 70000 is out of range")
    assert (str(err), err.message, err.errno, err.args) == ("port 70000 is out of range",) * 2 + (None,) + (
        ("port 70000 is out of range",),)


def test_an_error_with_errno_names_it() -> None:
    err = FlowsteerError("cannot read x", errno=errno.ENOENT)
    assert err.errno == errno.ENOENT and err.message == "cannot read x"
    assert str(err) == "cannot read x: ENOENT (No such file or directory)"


def test_an_unknown_errno_is_shown_as_its_number() -> None:
    assert str(FlowsteerError("odd", errno=4095)) == "odd: 4095 (Unknown error 4095)"


def test_kernel_errors_name_the_operation_and_detail() -> None:
    err = kernel_error("map update", errno.E2BIG, "too many")
    assert type(err) is KernelError
    assert (err.operation, err.message, err.errno) == ("map update", "map update: too many", errno.E2BIG)
    plain = KernelError("attach", errno.EINVAL)
    assert (plain.operation, plain.message, str(plain)) == ("attach", "attach", "attach: EINVAL (Invalid argument)")
    assert plain.log == "" and err.log == "" and kernel_error("load", errno.EPERM).log == ""
    assert kernel_error("load", errno.EPERM).message == "load"
    logged = kernel_error("load", errno.EACCES, "why", "the whole\nverifier log")
    assert (type(logged), logged.log, logged.message) == (PermissionDenied, "the whole\nverifier log", "load: why")
    assert kernel_error("load", errno.EINVAL, log="x").log == "x"


@pytest.mark.parametrize("err, cls", [(errno.EPERM, PermissionDenied), (errno.EACCES, PermissionDenied),
                                      (errno.ENOENT, KernelError), (errno.EBUSY, KernelError)])
def test_kernel_error_picks_the_class(err: int, cls: type) -> None:
    made = kernel_error("load", err, "why")
    assert type(made) is cls
    assert (made.operation, made.errno, made.message) == ("load", err, "load: why")


@pytest.mark.parametrize("text, whole", [("0", True), ("65535", True), ("007", True), ("", False), ("²", False),
                                         ("٣", False), ("1.5", False), ("-1", False), (" 1", False), ("a", False)])
def test_whole_numbers(text: str, whole: bool) -> None:
    assert is_whole_number(text) is whole


def test_already_exists_and_not_found_carry_their_errno() -> None:
    from flowsteer.errors import AlreadyExists, NotFound
    taken = AlreadyExists("group tcp:192.0.2.1:80 exists")
    assert (str(taken), taken.message, taken.errno) == (
        "group tcp:192.0.2.1:80 exists: EEXIST (File exists)", "group tcp:192.0.2.1:80 exists", errno.EEXIST)
    busy = AlreadyExists("slot 3 is taken", errno=errno.EBUSY)
    assert (busy.message, busy.errno) == ("slot 3 is taken", errno.EBUSY)
    missing = NotFound("no member 4")
    assert (str(missing), missing.message, missing.errno) == (
        "no member 4: ENOENT (No such file or directory)", "no member 4", errno.ENOENT)


@pytest.mark.parametrize("count, text", [(0, "0 sockets"), (1, "1 socket"), (2, "2 sockets"), (11, "11 sockets")])
def test_a_count_says_its_noun_in_the_plural_unless_it_is_one(count: int, text: str) -> None:
    assert counted(count, "socket") == text
