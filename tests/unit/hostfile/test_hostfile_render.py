"""The host file writer's exact text: what `flowsteer export` prints is read by people and diffed by
their configuration management, so its layout is pinned, not only that tomllib reads it back."""

from __future__ import annotations

import json
import math

import pytest

from flowsteer.hostfile.render import HEADER, _string, _value, render, to_toml
from flowsteer.hostfile.spec import HostSpec
from flowsteer.lookup.bindings import Binding


def test_toml_layout_scalars_first_then_sections_with_one_list_item_per_line() -> None:
    doc = {"section": {"items": [{"a": 1, "b key": "x"}, {}], "empty": [], "flag": True},
           "version": 2, "name": "web"}
    assert to_toml(doc) == (
        HEADER
        + 'version = 2\n'
        + 'name = "web"\n'
        + '\n'
        + '[section]\n'
        + 'items = [\n'
        + '  { a = 1, "b key" = "x" },\n'
        + '  {},\n'
        + ']\n'
        + 'empty = []\n'
        + 'flag = true\n')


def test_section_names_and_keys_that_are_not_bare_are_quoted() -> None:
    assert to_toml({"my section": {"a.b": 1, "ok_key-1": 2}}) == (
        HEADER + '\n["my section"]\n"a.b" = 1\nok_key-1 = 2\n')


@pytest.mark.parametrize(("value", "text"), [
    (True, "true"), (False, "false"), (0, "0"), (-7, "-7"), (1.5, "1.5"), (-0.25, "-0.25"),
    (math.inf, "inf"), (-math.inf, "-inf"), (math.nan, "nan"),
    ("", '""'), ([1, "a", [False]], '[1, "a", [false]]'), ([], "[]"), ({}, "{}"),
    ({"k": [1, 2], "x y": {}}, '{ k = [1, 2], "x y" = {} }'),
])
def test_values(value: object, text: str) -> None:
    assert _value(value) == text


def test_a_value_without_a_toml_form_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match=r"^no TOML form for object$"):
        _value(object())


@pytest.mark.parametrize(("text", "quoted"), [
    ('say "hi"', r'"say \"hi\""'), ("a\\b", r'"a\\b"'), ("\x00\x1f", r'"\u0000\u001f"'),
    ("del\x7f", r'"del\u007f"'), (" ~é", '" ~é"'),
])
def test_strings_escape_quotes_backslashes_and_control_characters_only(text: str, quoted: str) -> None:
    assert _string(text) == quoted


def test_render_chooses_the_format() -> None:
    spec = HostSpec(bindings=frozenset({Binding.parse("web", "tcp", "192.0.2.0/24", 80)}), groups=None,
                    rules=None)
    assert render(spec, "json") == json.dumps(spec.to_dict(), indent=2) + "\n"
    assert render(spec, "toml") == to_toml(spec.to_dict())
    assert render(spec, "toml").startswith(HEADER)
