"""A QUIC-style UDP service: each worker issues connection IDs, and flowsteer's ``key`` policy sends
every datagram carrying one to the worker that issued it — also after the client's address or port
changes (connection migration), which plain SO_REUSEPORT would send to a random worker.

    sudo python examples/reuseport_udp_keys.py udp:127.0.0.1:4433 --workers 4

Wire format (a toy, shaped like QUIC's short header): a client's first datagram is ``0x00 hello``; the
worker answers ``0x00`` + an 8-byte connection ID it assigned to itself. Later datagrams are
``0x40`` + connection ID + payload; the worker answers ``worker K: payload``. The group's policy reads
8 bytes at payload offset 1.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import cast

from flowsteer.reuseport import Membership, Policy
from flowsteer.reuseport.supervisor import main

KEY = Policy("key", key_offset=1, key_len=8)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, member: Membership) -> None:
        self.member = member
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        if data[:1] == b"\x00":
            cid = os.urandom(8)
            self.member.group.assign_key(cid, self.member.slot)  # datagrams with this ID come here
            self.transport.sendto(b"\x00" + cid, addr)
        elif data[:1] == b"\x40" and len(data) > 9:
            self.transport.sendto(f"worker {self.member.slot}: ".encode() + data[9:], addr)


async def _serve(member: Membership) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(member), sock=member.socket)
    await stop.wait()
    transport.close()


def serve(member: Membership) -> None:
    """Runs one worker until SIGTERM."""
    asyncio.run(_serve(member))


if __name__ == "__main__":
    main(serve, __doc__.splitlines()[0], policy=KEY)
