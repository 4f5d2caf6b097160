"""Writing a host file: the document of a :class:`~flowsteer.hostfile.spec.HostSpec` as TOML or JSON.

The TOML writer knows the host file's shapes only (sections of lists of strings, numbers and inline
tables), which is all ``export`` needs; ``tomllib`` reads back exactly what it wrote.
"""

from __future__ import annotations

import json
import re
from typing import Any

from flowsteer.hostfile.spec import HostSpec

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
HEADER = "# flowsteer host file: what `flowsteer apply` makes this host steer (format: docs/hostfile.md)\n"


def render(spec: HostSpec, fmt: str) -> str:
    """Returns ``spec`` as a host file in format ``toml`` or ``json``."""
    doc = spec.to_dict()
    if fmt == "json":
        return json.dumps(doc, indent=2) + "\n"
    return to_toml(doc)


def to_toml(doc: dict[str, Any]) -> str:
    """Returns TOML for ``doc``: scalars at the top, then each table as a section whose lists hold one
    item per line."""
    lines = [HEADER.rstrip("\n")]
    lines += [f"{_key(k)} = {_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for name, section in doc.items():
        if isinstance(section, dict):
            lines += ["", f"[{_key(name)}]"]
            for key, value in section.items():
                if isinstance(value, list) and value:
                    lines += [f"{_key(key)} = [", *(f"  {_value(item)}," for item in value), "]"]
                else:
                    lines.append(f"{_key(key)} = {_value(value)}")
    return "\n".join(lines) + "\n"


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _string(text: str) -> str:
    """Returns ``text`` as a TOML basic string: quote, backslash and control characters escaped."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char < " " or char == "\x7f":
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # Python spells inf, -inf and nan as TOML does
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    raise TypeError(f"no TOML form for {type(value).__name__}")
