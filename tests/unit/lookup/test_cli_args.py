"""Argument errors of the lookup commands are reported before anything touches the kernel."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from flowsteer.cli import main
from flowsteer.cli.common import parse_endpoint
from flowsteer.errors import InvalidInput


@pytest.mark.parametrize("args, message", [
    (["bind", "web", "tcp", "192.0.2.0/24", "http"], "invalid port 'http'"),
    (["bind", "web", "icmp", "192.0.2.0/24", "80"], "invalid protocol 'icmp'"),
    (["bind", "web", "tcp", "192.0.2.1/24", "80"], "invalid prefix '192.0.2.1/24'"),
    (["bind", "bad label", "tcp", "192.0.2.0/24", "80"], "invalid label"),
    (["explain", "tcp", "1.1.1.1", "192.0.2.1"], "invalid destination"),
    (["explain", "tcp", "2001:db8::1", "192.0.2.1:80"], "same address family"),
    (["explain", "tcp", "nope", "192.0.2.1:80"], "invalid source address"),
    (["bindings", "--port", "x"], "invalid port"),
    (["bind", "web", "tcp", "192.0.2.0/24", "8²"], "invalid port '8²'"),
    (["metrics", "--listen", "192.0.2.55:9464"], "listen on 192.0.2.55:9464: EADDRNOTAVAIL"),
    (["group", "show", "tcp:192.0.2.1:8²"], "port '8²' is not a number"),
    (["group", "weights", "tcp:192.0.2.1:80", "1=²"], "weight '²' in '1=²' is not a whole number"),
])
def test_bad_arguments(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert message in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_missing_argument_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["bind", "web", "tcp"])
    assert result.exit_code == 2 and "Missing argument" in result.output


@pytest.mark.parametrize("text, expected", [("192.0.2.1:80", ("192.0.2.1", 80)),
                                            ("[2001:db8::1]:53", ("2001:db8::1", 53))])
def test_endpoints(text: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize("text, expected", [("192.0.2.1", ("192.0.2.1", None)), ("2001:db8::1", ("2001:db8::1", None)),
                                            ("[2001:db8::1]", ("2001:db8::1", None)),
                                            ("198.51.100.9:0", ("198.51.100.9", 0))])
def test_endpoints_whose_port_may_be_left_out(text: str, expected: tuple[str, int | None]) -> None:
    assert parse_endpoint(text, "source", port=False) == expected


@pytest.mark.parametrize("text, message", [
    ("192.0.2.1", "invalid destination '192.0.2.1': use IPV4:PORT or [IPV6]:PORT"),
    ("host:80", "invalid destination address 'host'"),
    ("[::1]x", "invalid destination '[::1]x': use IPV4:PORT or [IPV6]:PORT"),
    ("[::1:80", "invalid destination '[::1:80': use IPV4:PORT or [IPV6]:PORT"),
    ("192.0.2.1:65536", "invalid port '65536'"),
])
def test_endpoint_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_endpoint(text)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize("text", ["192.0.2.1", "host:80", "[::1]:99999", "2001:db8::1:53"])
def test_bad_endpoints(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_endpoint(text)
