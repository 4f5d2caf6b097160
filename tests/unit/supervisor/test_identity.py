"""Worker identities: names and numbers resolve, unknown ones are clear errors, capabilities are read."""

from __future__ import annotations

import grp
import os
import pwd

import pytest

from flowsteer.errors import InvalidInput
from flowsteer.supervisor.identity import Identity, capabilities


def test_user_and_group_by_name_or_number() -> None:
    nobody = pwd.getpwnam("nobody")
    assert Identity.parse("nobody") == Identity(nobody.pw_uid, nobody.pw_gid)
    assert Identity.parse(str(nobody.pw_uid)) == Identity(nobody.pw_uid, nobody.pw_gid)
    root_group = grp.getgrgid(0).gr_name
    assert Identity.parse("nobody", root_group) == Identity(nobody.pw_uid, 0)
    assert Identity.parse("nobody", "0") == Identity(nobody.pw_uid, 0)


def test_unknown_user_or_group_is_named() -> None:
    with pytest.raises(InvalidInput, match="no user 'no-such-user-x'"):
        Identity.parse("no-such-user-x")
    with pytest.raises(InvalidInput, match="no group 'no-such-group-x'"):
        Identity.parse("nobody", "no-such-group-x")


def test_capabilities_of_this_process_are_read() -> None:
    caps = capabilities(os.getpid())
    assert set(caps) == {"effective", "permitted", "ambient"}
    assert (caps["effective"] != 0) == (os.geteuid() == 0)
