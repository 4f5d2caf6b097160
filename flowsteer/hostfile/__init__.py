"""One host, one file: every hook's steering configuration in one declarative TOML (or JSON) file.

- :func:`load` / :func:`parse` validate a whole host file into a :class:`HostSpec` (or raise InvalidInput
  naming file, section and entry);
- :func:`plan` compares it with the namespace's state: what would be added, removed and changed per hook;
- :func:`execute` carries a plan out, each hook's part atomically;
- :func:`read` returns the namespace's state as a :class:`HostSpec`, and :func:`render` writes one as a
  host file (``flowsteer export``).

A section present in the file owns its hook (what the file does not list is removed); a hook without a
section is left alone. The format and its rules: docs/hostfile.md.
"""

from flowsteer.hostfile.host import execute, plan, read
from flowsteer.hostfile.render import render
from flowsteer.hostfile.spec import GroupSpec, HostSpec, load, parse

__all__ = ["GroupSpec", "HostSpec", "execute", "load", "parse", "plan", "read", "render"]
