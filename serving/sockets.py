"""The standard library's socket on a connection's file, also where gevent has patched the module: gevent's
own would wait for data to come, or fail a read waiting on it, where the kernel's answers at once."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

from gevent import monkey

_PlainSocket = monkey.get_original("socket", "socket")


@contextlib.contextmanager
def plain(connection: socket.socket) -> Iterator[socket.socket]:
    """A plain socket on `connection`'s file, for one call; the file stays open and its owner's.
    Raises OSError or ValueError when the connection is closed already."""
    sock = _PlainSocket(fileno=connection.fileno())
    try:
        yield sock
    finally:
        sock.detach()
