"""The test session's network guard, loaded by every Python process the tests start (this folder is
put on PYTHONPATH by tests/conftest.py): a socket may connect only to a loopback address or a Unix
socket, and only loopback names resolve. Anything else raises `NetworkGuardError` and is written to
the file named by $IMAGEBROKER_NETGUARD_LOG, which the test session reads to fail the test."""

from __future__ import annotations

import ipaddress
import os
import socket

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}


class NetworkGuardError(ConnectionRefusedError):
    """A test tried to reach a host that is not this machine."""


def _loopback(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    if not isinstance(host, str):
        return False
    host = host.split("%", 1)[0]
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _refuse(what: str) -> NetworkGuardError:
    log = os.environ.get("IMAGEBROKER_NETGUARD_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {what}\n")
    return NetworkGuardError(f"network guard: tests may not reach {what} (loopback only)")


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _check(sock: socket.socket, address: object) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not (
            isinstance(address, tuple) and _loopback(address[0])):
        raise _refuse(f"connect {address!r}")


def connect(self: socket.socket, address: object) -> None:
    _check(self, address)
    return _connect(self, address)


def connect_ex(self: socket.socket, address: object) -> int:
    _check(self, address)
    return _connect_ex(self, address)


def getaddrinfo(host: object, *args: object, **kwargs: object) -> list:
    if host is not None and not _loopback(host):
        raise _refuse(f"resolve {host!r}")
    return _getaddrinfo(host, *args, **kwargs)


def install() -> None:
    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo


if os.environ.get("IMAGEBROKER_NETGUARD_LOG"):
    install()
