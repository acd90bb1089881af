"""The standard library's socket on a connection's file, also where gevent has patched the module: gevent's
own would wait for data to come, or fail a read waiting on it, where the kernel's answers at once."""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator

from gevent import monkey

_PlainSocket = monkey.get_original("socket", "socket")
# Linux's struct tcp_info: 8 bytes of u8 fields, 11 u32 (rto ... fackets, last_data_sent, last_ack_sent), then
# tcpi_last_data_recv, in ms. Other systems have no TCP_INFO here.
_TCP_INFO_SIZE, _LAST_DATA_RECV = 104, 52


@contextlib.contextmanager
def plain(connection: socket.socket) -> Iterator[socket.socket]:
    """A plain socket on `connection`'s file, for one call; the file stays open and its owner's.
    Raises OSError or ValueError when the connection is closed already."""
    sock = _PlainSocket(fileno=connection.fileno())
    try:
        yield sock
    finally:
        sock.detach()


def waiting(sock: socket.socket) -> bytes | None:
    """The next byte waiting unread on a connection, left there; b"" once the other end has closed (and all it
    sent is read), None while nothing more has come. Raises OSError when the connection was reset."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None


def received_within(sock: socket.socket, seconds: float) -> bool:
    """Whether bytes came on a TCP connection within the last `seconds`, read by now or not: any waiting unread,
    or (on Linux) data the kernel received that recently."""
    if waiting(sock):
        return True
    if not hasattr(socket, "TCP_INFO") or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    return struct.unpack_from("I", info, _LAST_DATA_RECV)[0] < seconds * 1000
