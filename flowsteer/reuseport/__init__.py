"""The reuseport hook: pick the worker (member) of a SO_REUSEPORT group for each new connection or flow.

- :func:`join` (a worker): become member K of a group and get a ready socket; ``Membership.leave()``.
- :class:`Group` (a supervisor): members, policy, weights, drain/undrain, keys, ``explain``.
- :func:`~flowsteer.reuseport.supervisor.supervisor`: runs a server as worker processes, one per member
  (flowsteer's one :class:`flowsteer.supervisor.Supervisor`); restarts that fail no request.
- :class:`Policy`: consistent, weighted, source, key, quic, locality or hash; :class:`Flow` and :func:`decide` model the
  program; :mod:`flowsteer.reuseport.quic` makes QUIC connection IDs that name their member.
"""

from flowsteer.reuseport.group import Group, MemberStatus
from flowsteer.reuseport.model import Decision, Flow, decide
from flowsteer.reuseport.policy import Policy
from flowsteer.reuseport.spec import GroupId
from flowsteer.reuseport.worker import Membership, join, open_member_socket

__all__ = ["Decision", "Flow", "Group", "GroupId", "MemberStatus", "Membership", "Policy", "decide",
           "join", "open_member_socket"]
