"""flowsteer: decide which socket gets which traffic on Linux.

Three hooks, each a subpackage with its state, operations and a pure-Python model (``explain``):

- :mod:`flowsteer.lookup` steers connections and datagrams by protocol, prefix and port (BPF sk_lookup);
- :mod:`flowsteer.reuseport` picks the worker inside a SO_REUSEPORT group by policy (BPF sk_reuseport);
- :mod:`flowsteer.divert` hands raw packets to Python and reinjects them (netfilter NFQUEUE).
"""

from flowsteer.errors import FlowsteerError

__all__ = ["FlowsteerError"]
__version__ = "0.1.0"
