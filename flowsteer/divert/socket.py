"""Divert sockets: bind a divert port, read raw IP packets, write them back (OpenBSD divert(4) on Linux).

::

    with DivertSocket() as sock:
        sock.bind(700)
        for packet, address in sock:
            sock.sendto(packet, address)        # or not: the packet is dropped after the hold time

``recvfrom`` returns the packet and an address ``(host, tag)``: ``host`` is the receiving interface's
address for inbound packets and the unspecified address for outbound ones; ``tag`` names the packet the
kernel holds. ``sendto(data, address)`` with that address releases the held packet (unchanged bytes
cost nothing; changed bytes are validated and get fresh checksums); with tag 0 (or just a host string)
it writes a new packet, which leaves as a locally generated packet and skips the divert rules.

Verdicts are sent in batches: when every packet already fetched from the kernel has been handled, when
``batch`` verdicts are waiting, before the socket blocks, and on :meth:`flush` and :meth:`close`.
``recvfrom_many`` and ``sendto_many`` read and write many packets in one call, with their verdicts
together (``sock.sendto_many(sock.recvfrom_many())`` writes a batch back).

``recvfrom`` and ``sendto`` are compiled (:class:`flowsteer.divert._nfqueue.SocketCore`, the base class,
holds the socket's state): a lone packet at a low rate (a blocking socket with nothing else fetched, held
or waiting for a verdict) goes through both without a line of Python, and so does each packet of a batch
already fetched that is written back unchanged, and the batch's accepts. Fetching a batch
(:meth:`DivertSocket._fill`), writing changed bytes, a :class:`Packet`, a drop or a new packet, and sending
verdicts other than accepts run here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import socket
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence

from flowsteer.divert import _nfqueue, control, netfilter
from flowsteer.divert._nfqueue import Counters  # what a socket did (compiled: a lone packet counts without Python)
from flowsteer.divert.inject import inject_incoming, local_addresses
from flowsteer.divert.nfqueue import NF_ACCEPT, NF_DROP, NF_REPEAT, Delivery, NfQueue, Verdict, rcvbuf_for
from flowsteer.divert.packet import Origin, Packet, finalize
from flowsteer.divert.ports import SLOTS, allocate_block, bound_queues, port_state, queue_number
from flowsteer.divert.rules import check_divert_port
from flowsteer.errors import FlowsteerError, InvalidInput, MissingFeature, kernel_error
from flowsteer.kernel import netns
from flowsteer.kernel.netns import entered, locked

SO_REUSEPORT_LB = 0x00010000
"""The load-balancing socket option (FreeBSD's value), set with ``setsockopt(SOL_SOCKET, …, 1)``."""
SO_MARK = 36
_SIOCGIFADDR = 0x8915
_INBOUND_HOOKS = (0, 1, 2)  # PREROUTING, LOCAL_IN, FORWARD
_UNSPECIFIED = {4: "0.0.0.0", 6: "::"}
_UNSPECIFIED_HOSTS = ("0.0.0.0", "::", "")
_IF_CACHE_SECONDS = 1.0
MAX_TIMEOUT = 2**31
"""Timeouts must be below this many seconds (a receive timeout the kernel can hold)."""


DivertAddress = tuple[str, int]
"""What ``recvfrom`` returns with a packet and ``sendto`` takes back: ``(host, tag)``, where ``host`` is
the receiving interface's address (inbound) or the unspecified address (outbound) and ``tag`` names the
held packet (0 for a new packet)."""


def check_hold_time(hold_time: float) -> None:
    """Raises InvalidInput unless ``hold_time`` (seconds) is within 0.001..60."""
    if not 0.001 <= hold_time <= 60:
        raise InvalidInput(f"hold time {hold_time} s is not within 0.001..60 s")


def check_queue_maxlen(queue_maxlen: int) -> None:
    """Raises InvalidInput unless ``queue_maxlen`` (packets) is an integer within 1..2**20."""
    check_count("queue length", queue_maxlen, 1 << 20)


def check_count(what: str, value: int, most: int) -> None:
    """Raises InvalidInput unless ``value`` is an integer (not a bool) within 1..``most``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInput(f"{what} {value!r} is not an integer")
    if not 1 <= value <= most:
        raise InvalidInput(f"{what} {value} is not within 1..{most}")


class DivertSocket(_nfqueue.SocketCore):
    """A divert socket; see the module documentation.

    ``hold_time`` bounds how long a read packet waits for ``sendto`` before it is dropped (seconds,
    0.001..60); ``queue_maxlen`` is how many packets the kernel holds for this socket per queue before
    it drops (or, for fail-open rules, accepts) more (the socket's receive buffer is sized to hold them:
    :func:`flowsteer.divert.nfqueue.rcvbuf_for`); ``batch`` is how many packets one read fetches;
    ``conntrack`` asks the kernel for each packet's connection state and id (it costs the kernel some
    work per packet, so it is off unless asked for).
    Like a socket, it belongs to the network namespace of the thread that creates it: binding, closing and
    writing new packets act there whatever namespace the calling thread is in later.
    Raises InvalidInput for values out of range.
    """

    def __init__(self, *, hold_time: float = 1.0, queue_maxlen: int = 1024, batch: int = 64,
                 conntrack: bool = False) -> None:
        check_hold_time(hold_time)
        check_queue_maxlen(queue_maxlen)
        check_count("batch", batch, 1024)
        self.hold_time = hold_time
        self.queue_maxlen = queue_maxlen
        self.batch = batch
        self.conntrack = conntrack
        self.counters = Counters()
        self.port: int | None = None
        self.slot: int | None = None
        self._lb = False
        self._closed = False
        self._defer = False
        self._timeout: float | None = None
        self._nfq: NfQueue | None = None
        self._ready: deque[Delivery] = deque()
        self._held: dict[int, Delivery] = {}
        self._verdicts: list[Verdict] = []
        self._accepts: list[Delivery] = []
        self._interfaces: dict[tuple[int, int], tuple[str, str]] = {}
        self._interfaces_until = 0.0
        self._addresses: dict[str, str] = {}
        self._addresses_until = 0.0
        self._raw: dict[int, socket.socket] = {}
        self._netns = open(netns.SELF, "rb")  # noqa: SIM115 (lives as long as the socket)

    # -- socket options and binding ---------------------------------------------------------------

    def setsockopt(self, level: int, option: int, value: int) -> None:
        """Sets SO_REUSEPORT_LB (the only option) before :meth:`bind`; raises InvalidInput otherwise."""
        if level != socket.SOL_SOCKET or option != SO_REUSEPORT_LB:
            raise InvalidInput(f"divert sockets support only SOL_SOCKET/SO_REUSEPORT_LB, not {level}/{option}")
        if self._nfq is not None:
            raise InvalidInput("SO_REUSEPORT_LB must be set before bind")
        self._lb = bool(value)

    def getsockopt(self, level: int, option: int) -> int:
        """Returns SO_REUSEPORT_LB's value; raises InvalidInput for anything else."""
        if level != socket.SOL_SOCKET or option != SO_REUSEPORT_LB:
            raise InvalidInput(f"divert sockets support only SOL_SOCKET/SO_REUSEPORT_LB, not {level}/{option}")
        return int(self._lb)

    def bind(self, port: int) -> None:
        """Binds divert ``port`` (1..65535) in the socket's network namespace.

        Without SO_REUSEPORT_LB the socket must be alone on the port; with it, it joins the port's
        load-balancing group in the lowest free slot, and the rules are recompiled so that new
        connections may reach it (established ones stay where they are).
        Raises InvalidInput for a bad port or a second bind, KernelError with EADDRINUSE when the port
        is taken (by an exclusive socket, or by anyone when this socket is exclusive), ENOSPC when the
        group has 32 members or 1023 other divert ports are in use, MissingFeature (EOPNOTSUPP) for
        ``conntrack=True`` on a kernel that cannot add conntrack data, PermissionDenied without
        CAP_NET_ADMIN.
        """
        self._check_open()
        check_divert_port(port)
        if self._nfq is not None:
            raise InvalidInput(f"socket is already bound to divert port {self.port}")
        with self._home(), locked():
            installed = netfilter.read()
            queues = bound_queues()
            block = installed.blocks.get(port) or allocate_block(port, installed.blocks, queues)
            state = port_state(port, {**installed.blocks, port: block}, queues)
            what = f"binding divert port {port}"
            if state.exclusive_portid is not None or (state.members and not self._lb):
                raise kernel_error(what, errno.EADDRINUSE, "the port is taken; every socket sharing a "
                                   "port must set SO_REUSEPORT_LB")
            if len(state.members) >= SLOTS:
                raise kernel_error(what, errno.ENOSPC, f"the group already has {SLOTS} members")
            slot = min(set(range(SLOTS)) - set(state.members)) if self._lb else 0
            slots = [slot] if self._lb else list(range(SLOTS))
            nfq = NfQueue(rcvbuf_for(self.queue_maxlen))
            try:
                for s in slots:
                    for fail_open in (False, True):
                        nfq.bind(queue_number(block, s, fail_open), fail_open=fail_open,
                                 maxlen=self.queue_maxlen, conntrack=self.conntrack)
                control.apply_locked(claim=(port, block), previous=installed)
            except FlowsteerError as exc:
                nfq.close()
                if exc.errno == errno.EPERM:
                    raise kernel_error(what, errno.EPERM, "needs CAP_NET_ADMIN") from None
                if exc.errno == errno.EOPNOTSUPP and self.conntrack:
                    raise MissingFeature(f"{what}: this kernel cannot add conntrack data to queued packets "
                                         "(built without CONFIG_NETFILTER_NETLINK_GLUE_CT, which Debian's "
                                         "kernels have); make the socket without conntrack=True",
                                         errno=errno.EOPNOTSUPP) from None
                raise
        self._nfq, self.port, self.slot = nfq, port, slot

    # -- reading ------------------------------------------------------------------------------------

    def recvfrom_many(self, limit: int | None = None) -> list[tuple[bytes, DivertAddress]]:
        """Returns the packets waiting now with their addresses, as :meth:`recvfrom` returns them one at a
        time: at least one (waits for the first as :meth:`recvfrom` does), then those that need no wait, at
        most ``limit`` in all (default ``batch``). With :meth:`sendto_many` a loop answers a batch without
        a line of Python per packet, only per call (at a low rate, one packet a call, the compiled
        :meth:`recvfrom` and :meth:`sendto` are quicker). Expires what is due before it reads, never a
        packet it returns. Raises as :meth:`recvfrom` (the packets read before the failure are not lost:
        the next read returns them first), InvalidInput for a limit below 1.
        """
        limit = self.batch if limit is None else limit
        if limit < 1:
            raise InvalidInput(f"batch limit {limit} is not positive")
        self._expire()  # here, not between the packets it reads (_fill_now): those must be held when returned
        return self._recvfrom_many(limit)

    def recv_packet(self) -> Packet:
        """Like :meth:`recvfrom`, but returns a parsed :class:`Packet` carrying its address and the
        kernel's metadata."""
        return self._packet(*self.recvfrom())

    def _packet(self, payload: bytes, address: DivertAddress) -> Packet:
        """Returns the parsed Packet of a packet just read (held under ``address``)."""
        delivery = self._held[address[1]]
        inbound = delivery.hook in _INBOUND_HOOKS
        ifindex = delivery.indev if inbound else delivery.outdev
        name = self._interface(ifindex, payload[0] >> 4 if payload else 4)[0] if ifindex else None
        origin = Origin(delivery.hook, delivery.indev, delivery.outdev, delivery.attrs, self._ifname)
        return Packet(payload, direction="in" if inbound else "out", interface=name, address=address,
                      origin=origin)

    def recv_batch(self, limit: int | None = None) -> list[Packet]:
        """Returns the packets waiting now as parsed :class:`Packet` objects (at least one: waits for the
        first as :meth:`recvfrom` does, then takes at most ``limit``, default ``batch``, that need no
        wait). Raises as :meth:`recvfrom`.
        """
        return [self._packet(payload, address) for payload, address in self.recvfrom_many(limit)]

    def send_batch(self, results: Sequence[Packet | bytes | bytearray | None], packets: Sequence[Packet]) -> int:
        """Answers a batch: ``results[i]`` is written back for ``packets[i]`` (a Packet or bytes), or the
        packet is dropped when it is None; the verdicts leave together (:meth:`sendto_many`). Returns how
        many were written.

        Raises InvalidInput before answering any when the lengths differ or a packet was not read from a
        divert socket; raises as :meth:`sendto_many` at a result it refuses (one that is not a valid IP
        packet): the packets answered before it are answered, the rest stay held.
        """
        if len(results) != len(packets):
            raise InvalidInput(f"{len(results)} results for {len(packets)} packets")
        addresses = [packet.address for packet in packets]
        if any(address is None for address in addresses):
            raise InvalidInput("a packet of the batch was not read from a divert socket")
        return self.sendto_many(zip(results, addresses, strict=True))

    def pending(self) -> int:
        """Returns how many packets were fetched from the kernel and not yet returned by a read."""
        return len(self._ready)

    def __iter__(self) -> Iterator[tuple[bytes, DivertAddress]]:
        """Yields ``(packet, address)`` until the socket would block or its timeout passes."""
        while True:
            try:
                yield self.recvfrom()
            except (BlockingIOError, TimeoutError):
                return

    async def recvfrom_async(self) -> tuple[bytes, DivertAddress]:
        """Awaits the next packet in the running asyncio loop (the socket's timeout does not apply)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                if not self._ready:
                    self._fill(0.0)
                return self.recvfrom()
            except BlockingIOError:
                pass
            ready: asyncio.Future[None] = loop.create_future()
            fd = self.fileno()
            loop.add_reader(fd, _wake, ready)
            try:
                await asyncio.wait_for(ready, self._until_expiry())
            except TimeoutError:
                pass
            finally:
                loop.remove_reader(fd)

    async def __aiter__(self) -> AsyncIterator[tuple[bytes, DivertAddress]]:
        """Yields ``(packet, address)`` forever, awaiting each."""
        while True:
            yield await self.recvfrom_async()

    # -- writing ------------------------------------------------------------------------------------

    def _sendto(self, data: bytes | bytearray | Packet, address: DivertAddress | str) -> int:
        """``sendto`` (compiled, see the base class) for every case but a packet written back unchanged
        (bytes to the address it came with); returns and raises as it."""
        raw: bytes | bytearray
        if isinstance(data, Packet):
            raw, mark = data.data, data.new_mark
        else:
            raw, mark = data, None
        if type(address) is tuple and len(address) == 2 and type(address[1]) is int:
            host, tag = address  # the common case, checked inline: every packet of a batch comes here
        else:
            tag = _tag(address)
            host = address if isinstance(address, str) else address[0]  # type: ignore[assignment]
        held = self._held.get(tag)
        if held is None:
            self._check_open()
            if tag == 0:
                _refuse_new_mark(mark, "a new packet")
                return self._write_new(finalize(raw), host)
            held = self._lookup(tag)
        if host != held.host:
            _refuse_new_mark(mark, "a packet written to another address than it came with")
            return self._redirect(tag, held, raw, host)
        if mark is None and (raw is held.payload or raw == held.payload):
            del self._held[tag]
            self._accepts.append(held)
        else:  # changed bytes, or a new mark
            same = mark is not None and raw == held.payload
            payload = None if same else self._changed(raw, held)
            if self._accepts:  # written before it, they leave first, after the verdicts written before them:
                self.flush()  # alone, a batch accept could take a packet whose changed verdict still waits
            del self._held[tag]
            self._verdicts.append(Verdict(held.queue, held.packet_id, NF_ACCEPT, payload, mark))
            self.counters.modified += payload is not None
            self.counters.accepted += payload is None
        self._flush_if_due()
        return len(raw)

    def _redirect(self, tag: int, held: Delivery, raw: bytes | bytearray, host: str) -> int:
        """Writes a held packet back the way ``host`` says (divert(4)): as incoming on the interface that
        has address ``host``, or as outgoing for the unspecified address; the held original is dropped."""
        sent = self._write_new(self._changed(raw, held), host)  # checksums too: offload may have left them
        del self._held[tag]
        self._verdicts.append(Verdict(held.queue, held.packet_id, NF_DROP))
        self.counters.redirected += 1
        self._flush_if_due()
        return sent

    def _write_new(self, packet: bytes, host: str) -> int:
        """Writes a new packet: outgoing (routed) for an unspecified ``host``, else as incoming on the
        interface with address ``host``. Raises InvalidInput when no interface has that address."""
        ifname = None
        if host not in _UNSPECIFIED_HOSTS:
            with self._home():
                ifname = self._address_interface(host)
        self.flush()  # the packets written before it leave first: it goes out at once, their verdicts may wait
        if ifname is None or ifname == "lo":  # routed; a local packet, routed to a local address, arrives on lo
            return self._inject(packet)
        with self._home():
            try:
                inject_incoming(packet, ifname, socket.if_nametoindex(ifname))
            except OSError as exc:
                raise kernel_error(f"finding interface {ifname}", exc.errno or errno.ENODEV) from None
        self.counters.injected += 1
        return len(packet)

    def _address_interface(self, host: str) -> str:
        """Returns the interface that has address ``host`` (cached for a second); raises InvalidInput."""
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            raise InvalidInput(f"{host!r} is not an IP address") from None
        name = self._addresses.get(host)
        if name is None and time.monotonic() > self._addresses_until:
            self._addresses = local_addresses()
            self._addresses_until = time.monotonic() + _IF_CACHE_SECONDS
            name = self._addresses.get(host)
        if name is None:
            raise InvalidInput(f"{host!r} is neither the unspecified address nor an address of an interface "
                               "in the socket's network namespace")
        return name

    @staticmethod
    def _changed(raw: bytes | bytearray, held: Delivery) -> bytes:
        """Returns changed bytes ready to replace a held packet; raises InvalidInput when they cannot."""
        if held.truncated:
            raise InvalidInput("the packet was larger than the 65535 bytes copied to user space; "
                               "it can be written back only unchanged")
        return finalize(raw)

    def drop(self, address: DivertAddress) -> None:
        """Drops the held packet ``address`` names now; raises InvalidInput when it names none."""
        self._check_open()
        tag = _tag(address)
        delivery = self._lookup(tag)
        del self._held[tag]
        self._verdicts.append(Verdict(delivery.queue, delivery.packet_id, NF_DROP))
        self.counters.dropped += 1
        self._flush_if_due()

    def flush(self) -> None:
        """Sends every waiting verdict now: the accepts last (compiled, ``_send_accepts``: in write order, one
        batch accept per run of a queue's accepts written in its order), so that a batch accept does not
        take a packet that an earlier verdict drops. Raises KernelError when the kernel refuses them; when
        it refuses the other verdicts, they and the accepts stay waiting, the others to go first again (a
        batch accept sent without them would take the packets they drop)."""
        if self._nfq is None:
            return
        if self._verdicts:
            verdicts, self._verdicts = self._verdicts, []
            try:
                self._nfq.send_verdicts(verdicts)
            except FlowsteerError:
                self._verdicts[:0] = verdicts
                raise
        self._send_accepts()

    # -- life cycle ---------------------------------------------------------------------------------

    def fileno(self) -> int:
        """Returns the file descriptor to poll for readability; raises InvalidInput when unbound."""
        return self._bound().fileno()

    def settimeout(self, timeout: float | None) -> None:
        """None blocks, 0 never waits, a positive value waits at most that many seconds. Raises
        InvalidInput for a negative, infinite or NaN timeout, or one of 2**31 seconds or more."""
        if timeout is not None and not 0 <= timeout < MAX_TIMEOUT:
            raise InvalidInput(f"timeout {timeout} is not a number of seconds from 0 to {MAX_TIMEOUT} "
                               "(None waits as long as it takes)")
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        """Returns the timeout set by :meth:`settimeout`."""
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        """``setblocking(False)`` is ``settimeout(0)``, ``setblocking(True)`` is ``settimeout(None)``."""
        self._timeout = None if flag else 0.0

    def close(self) -> None:
        """Leaves the port: rules are recompiled without this socket, packets it has not read yet go back
        through the rules (to the remaining members, or dropped/accepted as with no socket), packets it
        read but did not write back are dropped. Closing twice is harmless.
        """
        if self._closed:
            return
        for raw in self._raw.values():
            raw.close()
        nfq = self._nfq
        try:
            if nfq is not None:
                with self._home(), locked():
                    control.apply_locked(exclude_portid=nfq.portid)
                    self.flush()
                    unread = list(self._ready) + nfq.receive(1 << 16)
                    self._ready.clear()
                    self.counters.requeued += len(unread)
                    nfq.send_verdicts([Verdict(d.queue, d.packet_id, NF_REPEAT) for d in unread])
        finally:
            self._closed = True
            self._nfq = None
            self._held.clear()
            self._ready.clear()
            if nfq is not None:
                nfq.close()
            self._netns.close()

    def __enter__(self) -> DivertSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidInput("divert socket is closed")

    def _bound(self) -> NfQueue:
        self._check_open()
        if self._nfq is None:
            raise InvalidInput("divert socket is not bound to a port")
        return self._nfq

    def _fill(self, timeout: float | None) -> None:
        """Fetches a batch of packets into the ready list, waiting as ``timeout`` allows."""
        nfq = self._bound()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._expire()
            if self._verdicts or self._accepts or timeout == 0:
                fetched = nfq.receive(self.batch)
                if fetched:
                    break
                self.flush()  # answer everything before waiting
            wait = self._until_expiry()
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    if timeout == 0:
                        raise BlockingIOError(errno.EAGAIN, "no diverted packet is waiting")
                    raise TimeoutError("no diverted packet arrived in time")
                wait = left if wait is None else min(wait, left)
            fetched = nfq.receive(self.batch, wait)
            if fetched:
                break
        self._admit(fetched)

    def _fill_now(self) -> None:
        """Fetches what is waiting without blocking (nothing when nothing is). Unlike :meth:`_fill` it
        expires nothing and sends nothing: recvfrom_many calls it between the packets it returns, which
        must still be held when it returns them (recvfrom_many expires what is due before it reads)."""
        fetched = self._bound().receive(self.batch)
        if fetched:
            self._admit(fetched)

    def _lookup(self, tag: int) -> Delivery:
        held = self._held.get(tag)
        if held is None:
            raise InvalidInput(f"no packet with tag {tag} is held: it was answered already or its hold "
                               f"time ({self.hold_time} s) passed")
        return held

    def _expire(self) -> None:
        if not self._held:  # a lone packet at a low rate finds nothing held: no clock to read
            return
        now = time.monotonic()
        while self._held:
            tag, delivery = next(iter(self._held.items()))
            if delivery.deadline > now:
                break
            del self._held[tag]
            self._verdicts.append(Verdict(delivery.queue, delivery.packet_id, NF_DROP))
            self.counters.expired += 1

    def _until_expiry(self) -> float | None:
        if not self._held:
            return None
        return max(0.0, next(iter(self._held.values())).deadline - time.monotonic())

    def _interface(self, ifindex: int, version: int) -> tuple[str, str]:
        """Returns (name, address) of an interface; cached for up to a second."""
        key = (ifindex, version)
        known = self._interfaces.get(key)
        if known is None:
            with self._home():
                try:
                    name = socket.if_indextoname(ifindex)
                except OSError:
                    name = str(ifindex)
                known = self._interfaces[key] = (name, _interface_address(name, version))
        return known

    def _ifname(self, ifindex: int) -> str:
        return self._interface(ifindex, 4)[0]

    def _home(self) -> contextlib.AbstractContextManager[None]:
        """Runs the ``with`` block in the socket's network namespace."""
        return entered(f"/proc/self/fd/{self._netns.fileno()}")

    def _inject(self, packet: bytes) -> int:
        version = packet[0] >> 4
        raw = self._raw.get(version)
        try:
            if raw is None:
                family = socket.AF_INET if version == 4 else socket.AF_INET6
                with self._home():
                    raw = socket.socket(family, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.IPPROTO_RAW)
                raw.setsockopt(socket.SOL_SOCKET, SO_MARK, struct.pack("I", netfilter.SKIP_MARK))
                self._raw[version] = raw
            dst = str(ipaddress.ip_address(packet[16:20] if version == 4 else packet[24:40]))
            sent = raw.sendto(packet, (dst, 0))
        except OSError as exc:
            raise kernel_error("writing a new packet", exc.errno or errno.EIO) from None
        self.counters.injected += 1
        return sent


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _refuse_new_mark(mark: int | None, what: str) -> None:
    """Raises InvalidInput when ``mark`` (a Packet's ``set_mark``) is set: ``what`` leaves as a packet
    flowsteer writes itself, with the mark that lets it pass the divert rules, so it cannot carry another."""
    if mark is not None:
        raise InvalidInput(f"{what} cannot carry a mark of its own (set_mark): it leaves with flowsteer's mark, "
                           "which lets it pass the divert rules; set marks on packets written back to their address")


def _tag(address: object) -> int:
    """Returns the tag of a ``(host, tag)`` address, 0 for a host string; raises InvalidInput otherwise."""
    if type(address) is tuple and len(address) == 2 and type(address[1]) is int and address[1] >= 0:
        return address[1]
    if isinstance(address, str):
        return 0
    raise InvalidInput(f"address {address!r} is not an address returned by recvfrom or a host string")


def _interface_address(name: str, version: int) -> str:
    """Returns an address of interface ``name`` in the given IP version, or the unspecified address."""
    if version == 4:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                reply = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                return _UNSPECIFIED[4]
        return socket.inet_ntoa(reply[20:24])
    try:
        with open("/proc/thread-self/net/if_inet6") as f:
            rows = [line.split() for line in f]
    except OSError:
        return _UNSPECIFIED[6]
    mine = [r for r in rows if r[5] == name]
    mine.sort(key=lambda r: r[3] == "20")  # global scope before link-local
    if not mine:
        return _UNSPECIFIED[6]
    return str(ipaddress.IPv6Address(bytes.fromhex(mine[0][0])))
