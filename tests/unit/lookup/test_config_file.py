"""Binding files are read bounded: only regular files, never more than the documented size, no blocking."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flowsteer.errors import InvalidInput
from flowsteer.files import MAX_INPUT_BYTES
from flowsteer.lookup.config import load_file


@pytest.mark.timeout(20)
def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "bindings.toml"
    os.mkfifo(fifo)  # nobody ever writes to it: reading would block forever
    with pytest.raises(InvalidInput, match="is a FIFO, not a regular file"):
        load_file(str(fifo))


@pytest.mark.timeout(20)
def test_a_link_to_a_device_is_refused_without_reading_it(tmp_path: Path) -> None:
    link = tmp_path / "bindings.toml"
    link.symlink_to("/dev/zero")  # endless: reading it would grow without bound
    with pytest.raises(InvalidInput, match="is a character device, not a regular file"):
        load_file(str(link))


def test_a_file_above_the_limit_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "bindings.json"
    with open(big, "wb") as f:
        f.truncate(MAX_INPUT_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(InvalidInput, match="larger than 67,108,864 bytes"):
        load_file(str(big))


def test_a_file_at_the_limit_is_read(tmp_path: Path) -> None:
    doc = b'{"bindings": []}'
    exact = tmp_path / "bindings.json"
    exact.write_bytes(doc + b" " * (MAX_INPUT_BYTES - len(doc)))
    assert load_file(str(exact)) == []
