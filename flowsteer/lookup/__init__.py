"""The lookup hook: steer new connections and datagrams by protocol, prefix and port (BPF sk_lookup).

- :class:`Dispatcher`: load/unload/upgrade, bind/unbind/apply bindings, register sockets, explain, status.
- :class:`Binding`: ``protocol prefix port → label``; :func:`load_file` reads TOML/JSON binding files.
- :func:`decide` and :class:`Decision`: the pure-Python model of the dispatcher's choice.
- :class:`ReplyingSocket`: UDP replies from each datagram's original destination.
"""

from flowsteer.lookup.bindings import Binding
from flowsteer.lookup.config import load_file
from flowsteer.lookup.dispatcher import ApplyResult, DestinationStatus, Dispatcher
from flowsteer.lookup.model import Decision, decide
from flowsteer.lookup.udp import ReplyingSocket

__all__ = ["ApplyResult", "Binding", "Decision", "DestinationStatus", "Dispatcher", "ReplyingSocket", "decide",
           "load_file"]
