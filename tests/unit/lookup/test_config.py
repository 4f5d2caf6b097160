"""Binding files: TOML and JSON, expansion, and errors that point at the bad entry."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowsteer.errors import InvalidInput
from flowsteer.lookup.bindings import Binding
from flowsteer.lookup.config import load_file, parse

TOML = """
[[bindings]]
label = "nginx"
protocol = "tcp"
prefix = "192.0.2.0/24"
port = 80

[[bindings]]
label = "dns"
protocol = "udp"
prefixes = ["198.51.100.1", "2001:db8::53"]
ports = [53, 5353]
"""


def test_toml_and_json_say_the_same() -> None:
    from_toml = parse(TOML, "toml")
    import tomllib
    from_json = parse(json.dumps(tomllib.loads(TOML)), "json")
    assert from_toml == from_json
    assert len(from_toml) == 5
    assert Binding.parse("dns", "udp", "2001:db8::53", 5353) in from_toml


@pytest.mark.parametrize("text, message", [
    ("bindings = 3", "'bindings' must be a list"),
    ("[x]\ny = 1", "single top-level 'bindings'"),
    ("[[bindings]]\nlabel='a'\nprotocol='tcp'\nprefix='192.0.2.0/24'", "binding entry 1: give exactly one of 'port'"),
    ("[[bindings]]\nlabel='a'\nprotocol='tcp'\nprefix='192.0.2.0/24'\nport=1\nprefixes=['1.1.1.1']",
     "give exactly one of 'prefix' or 'prefixes'"),
    ("[[bindings]]\nlabel='a'\nprotocol='tcp'\nprefix='192.0.2.1/24'\nport=1", "invalid prefix"),
    ("[[bindings]]\nlabel='a'\nprotocol='tcp'\nprefix='192.0.2.0/24'\nport=1\ncolour='red'", "unknown field(s) colour"),
    ("[[bindings]]\nprotocol='tcp'\nprefix='192.0.2.0/24'\nport=1", "missing field 'label'"),
    ("[[bindings]]\nlabel='a'\nprotocol='tcp'\nprefixes=[]\nport=1", "'prefixes' must be a non-empty list"),
    ("[[bindings", "not valid TOML"),
])
def test_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(text, "toml", "f.toml")


def test_missing_file(tmp_path: object) -> None:
    with pytest.raises(InvalidInput, match="cannot read"):
        load_file("/nonexistent/bindings.toml")


@given(st.text(max_size=200))
def test_arbitrary_text_never_crashes(text: str) -> None:
    for fmt in ("toml", "json"):
        try:
            parse(text, fmt)
        except InvalidInput:
            pass


@pytest.mark.parametrize("again, message", [
    (True, "invalid port True"),          # True == 1, and hashes alike
    (1.0, "invalid port 1.0"),
    ([1], "invalid port \\[1\\]"),        # unhashable: parsed, not looked up
    ("80", None),                          # the text of a number is a port
])
def test_a_value_seen_before_is_checked_as_itself(again: object, message: str | None) -> None:
    # Each distinct value is parsed once per file; a value equal to an earlier one but of another type
    # must still be refused.
    entries = [{"label": "a", "protocol": "tcp", "prefix": "192.0.2.1", "port": 1},
               {"label": "a", "protocol": "tcp", "prefix": "192.0.2.2", "port": again}]
    text = json.dumps({"bindings": entries})
    if message is None:
        assert [x.port for x in parse(text, "json")] == [1, 80]
    else:
        with pytest.raises(InvalidInput, match=f"binding entry 2: {message}"):
            parse(text, "json")
