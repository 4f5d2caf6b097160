"""``flowsteer version``: this package's version, the running kernel's release and the libbpf it loads."""

from __future__ import annotations

import os
from typing import Any

from flowsteer import __version__
from flowsteer.cli import main
from flowsteer.cli.common import emit, json_option
from flowsteer.errors import FlowsteerError
from flowsteer.kernel import libbpf


def versions() -> dict[str, Any]:
    """Returns the versions of flowsteer, the kernel and libbpf (None, with ``libbpf_error``, when libbpf
    cannot be loaded)."""
    data: dict[str, Any] = {"flowsteer": __version__, "kernel": os.uname().release}
    try:
        data["libbpf"] = libbpf.version()
    except FlowsteerError as exc:  # libbpf.so.1 could not be loaded
        data.update(libbpf=None, libbpf_error=str(exc))
    return data


def _render(data: dict[str, Any]) -> str:
    return "\n".join([f"flowsteer {data['flowsteer']}", f"kernel    {data['kernel']}",
                      f"libbpf    {data['libbpf'] or 'not loadable: ' + data['libbpf_error']}"])


@main.command("version")
@json_option
def version(as_json: bool) -> None:
    """Show the versions of flowsteer, the running kernel and libbpf."""
    emit(versions(), as_json, _render)
