"""One worker supervisor for every hook (see :mod:`flowsteer.supervisor.core`), with health probes,
unprivileged workers and socket handover between processes (:mod:`flowsteer.supervisor.handover`)."""

from flowsteer.supervisor.core import Event, Ready, Service, Supervisor, WorkerError
from flowsteer.supervisor.identity import Identity
from flowsteer.supervisor.probe import Probe

__all__ = ["Event", "Identity", "Probe", "Ready", "Service", "Supervisor", "WorkerError"]
