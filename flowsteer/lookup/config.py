"""Declarative binding files for ``flowsteer apply``: TOML or JSON.

Both spell the same structure, a list of entries under ``bindings``; an entry names one label and one
protocol and either one ``prefix`` or a list of ``prefixes``, and either one ``port`` or a list of
``ports`` (every combination is bound)::

    [[bindings]]
    label = "nginx"
    protocol = "tcp"
    prefix = "192.0.2.0/24"
    port = 80

    [[bindings]]
    label = "dns"
    protocol = "udp"
    prefixes = ["198.51.100.1", "198.51.100.2"]
    ports = [53]
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from typing import Any, TypeVar

from flowsteer.errors import InvalidInput
from flowsteer.files import read_input
from flowsteer.lookup.bindings import Binding, building_many, parse_label, parse_port, parse_prefix, parse_protocol

_KEYS = {"label", "protocol", "prefix", "prefixes", "port", "ports"}
T = TypeVar("T")


def load_file(path: str) -> list[Binding]:
    """Returns the bindings in the TOML (``*.toml``) or JSON file at ``path``.

    Raises InvalidInput naming the file, and the entry and field where it is wrong; also when it is not
    a regular file or is larger than ``flowsteer.files.MAX_INPUT_BYTES`` (64 MiB).
    """
    return parse(read_file(path), file_format(path), path)


def read_file(path: str) -> str:
    """Returns the text of the configuration file at ``path``; raises InvalidInput when it cannot be read,
    is not a regular file or is larger than ``flowsteer.files.MAX_INPUT_BYTES``."""
    return read_input(path).decode(errors="replace")


def file_format(path: str) -> str:
    """Returns ``json`` for a path ending in ``.json`` (any case), else ``toml``."""
    return "json" if path.lower().endswith(".json") else "toml"


def decode(text: str, fmt: str, source: str) -> Any:
    """Returns the document ``text`` in format ``toml`` or ``json``; raises InvalidInput naming ``source``
    when it is not valid."""
    try:
        return json.loads(text) if fmt == "json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput(f"{source}: not valid {fmt.upper()}: {exc}") from None


def parse(text: str, fmt: str, source: str = "<input>") -> list[Binding]:
    """Returns the bindings described by ``text`` in format ``toml`` or ``json``; raises InvalidInput."""
    doc = decode(text, fmt, source)
    if not isinstance(doc, dict) or set(doc) - {"bindings"}:
        raise InvalidInput(f"{source}: expected a single top-level 'bindings' list")
    return parse_entries(doc.get("bindings", []), source)


def parse_entries(entries: Any, where: str) -> list[Binding]:
    """Returns the bindings of a ``bindings`` list; raises InvalidInput starting with ``where`` and naming
    the entry (``binding entry N``) and field that are wrong."""
    if not isinstance(entries, list):
        raise InvalidInput(f"{where}: 'bindings' must be a list of tables")
    out: list[Binding] = []
    fields = _FieldParses()
    with building_many():
        for index, entry in enumerate(entries, 1):
            try:
                out.extend(_entry(entry, fields))
            except InvalidInput as exc:
                raise InvalidInput(f"{where}: binding entry {index}: {exc.message}") from None
    return out


class _FieldParses:
    """The parse of each distinct field value met so far in one file: a large file names far fewer
    labels, protocols, prefixes and ports than it has entries, and parsing each again was most of the
    cost of reading it."""

    def __init__(self) -> None:
        # keyed by type too: True == 1 == 1.0, but only 1 is a port
        self._done: dict[tuple[Callable[[Any], Any], type, Any], Any] = {}

    def parse(self, parse: Callable[[Any], T], value: Any) -> T:
        """Returns ``parse(value)``, computed once per value; an error is raised each time."""
        try:
            return self._done[parse, type(value), value]  # type: ignore[no-any-return]
        except KeyError:
            parsed = self._done[parse, type(value), value] = parse(value)
            return parsed
        except TypeError:  # unhashable (a list or table where a value belongs): parse says what is wrong
            return parse(value)


def _entry(entry: Any, fields: _FieldParses) -> list[Binding]:
    if not isinstance(entry, dict):
        raise InvalidInput("must be a table with label, protocol, prefix(es) and port(s)")
    if not entry.keys() <= _KEYS:
        raise InvalidInput(f"unknown field(s) {', '.join(sorted(entry.keys() - _KEYS))}")
    label = fields.parse(parse_label, _required(entry, "label"))
    protocol = fields.parse(parse_protocol, _required(entry, "protocol"))
    prefixes = [fields.parse(parse_prefix, p) for p in _one_or_many(entry, "prefix", "prefixes")]
    ports = [fields.parse(parse_port, p) for p in _one_or_many(entry, "port", "ports")]
    return [Binding.from_parts(label, protocol, port, *prefix) for prefix in prefixes for port in ports]


def _required(entry: dict[str, Any], key: str) -> Any:
    if key not in entry:
        raise InvalidInput(f"missing field {key!r}")
    return entry[key]


def _one_or_many(entry: dict[str, Any], one: str, many: str) -> list[Any]:
    if (one in entry) == (many in entry):
        raise InvalidInput(f"give exactly one of {one!r} or {many!r}")
    if one in entry:
        return [entry[one]]
    values = entry[many]
    if not isinstance(values, list) or not values:
        raise InvalidInput(f"{many!r} must be a non-empty list")
    return values
