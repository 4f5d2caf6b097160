from __future__ import annotations

from collections.abc import Iterator

import pytest

from flowsteer.kernel.netns import NamedNetns
from flowsteer.lookup.dispatcher import Dispatcher


@pytest.fixture
def dispatcher(netns: NamedNetns, bpffs_root: str) -> Iterator[Dispatcher]:
    """A dispatcher loaded in the test's namespace (the test body already runs inside it)."""
    d = Dispatcher(bpffs_root=bpffs_root)
    d.load()
    yield d
