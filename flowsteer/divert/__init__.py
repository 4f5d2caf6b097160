"""The divert hook: OpenBSD-style divert sockets with FreeBSD-style load-balancing groups, on NFQUEUE.

:class:`Divert` is the front door for one network namespace (rules, status, explain, serve, capture).
Rules (:class:`Rule`, managed with :mod:`flowsteer.divert.control`) send matching packets to a divert
port; a :class:`DivertSocket` bound to the port reads them and writes them back; sockets with
``SO_REUSEPORT_LB`` share a port as a group whose members keep whole connections; :func:`explain` says
where a packet goes; :func:`supervisor` runs a handler (per packet, or per batch with
:func:`batch_handler`) as a group of worker processes; :class:`PcapngWriter` writes packets for tcpdump.
"""

from flowsteer.divert.pcapng import PcapngWriter
from flowsteer.divert.front import Divert
from flowsteer.divert.handling import batch_handler
from flowsteer.divert.model import Flow, explain
from flowsteer.divert.packet import Packet
from flowsteer.divert.rules import Rule
from flowsteer.divert.serve import DivertService, supervisor
from flowsteer.divert.socket import SO_REUSEPORT_LB, DivertAddress, DivertSocket

__all__ = ["Divert", "DivertAddress", "DivertService", "DivertSocket", "Flow", "Packet", "PcapngWriter", "Rule",
           "SO_REUSEPORT_LB", "batch_handler", "explain", "supervisor"]
