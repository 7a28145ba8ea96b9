"""The test session's network guard, loaded by every Python process the tests start (this folder is
put on PYTHONPATH by tests/conftest.py): a socket may connect only to a loopback address or a Unix
socket, and only loopback names resolve. Anything else raises `NetworkGuardError` and is written to
the file named by $IMAGEBROKER_NETGUARD_LOG, which the test session reads to fail the test."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
import sys

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}
SIOCGIFADDR = 0x8915
# What a process that is not the code under test is known to try at start, refused like anything else
# but not blamed on the test that started it: Ray's head (its dashboard process, even with usage stats
# off) asks the cloud metadata servers which cloud it runs on.
NOT_BLAMED = {"ray/dashboard/dashboard.py": {"169.254.169.254", "metadata.google.internal"}}


def _own_addresses() -> set[str]:
    """The addresses of this machine's own interfaces: a connection to one never leaves the machine
    (Ray's processes talk to each other on the node's address, not on 127.0.0.1)."""
    found: set[str] = set()
    try:
        names = [name for _, name in socket.if_nameindex()]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for name in names:
                try:
                    packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
                except OSError:
                    continue
                found.add(socket.inet_ntoa(packed[20:24]))
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as f:
            for line in f:
                raw = line.split()[0]
                found.add(str(ipaddress.ip_address(bytes.fromhex(raw))))
    except (OSError, ValueError):
        pass
    return found


OWN = _own_addresses()


class NetworkGuardError(ConnectionRefusedError):
    """A test tried to reach a host that is not this machine."""


def _loopback(host: object) -> bool:
    """Loopback, the unspecified address (what a server binds to), or one of this machine's own."""
    if isinstance(host, bytes):
        host = host.decode()
    if not isinstance(host, str):
        return False
    host = host.split("%", 1)[0]
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified or str(address) in OWN


def _blamed(host: object) -> bool:
    program = sys.argv[0] if sys.argv else ""
    return not any(program.endswith(p) and str(host) in hosts for p, hosts in NOT_BLAMED.items())


def _refuse(what: str, host: object = None) -> NetworkGuardError:
    log = os.environ.get("IMAGEBROKER_NETGUARD_LOG")
    if log and _blamed(host):
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {what}\n")
    return NetworkGuardError(f"network guard: tests may not reach {what} (loopback only)")


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _check(sock: socket.socket, address: object) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not (
            isinstance(address, tuple) and _loopback(address[0])):
        raise _refuse(f"connect {address!r}", address[0] if isinstance(address, tuple) else None)


def connect(self: socket.socket, address: object) -> None:
    _check(self, address)
    return _connect(self, address)


def connect_ex(self: socket.socket, address: object) -> int:
    _check(self, address)
    return _connect_ex(self, address)


def getaddrinfo(host: object, *args: object, **kwargs: object) -> list:
    if host is not None and not _loopback(host):
        raise _refuse(f"resolve {host!r}", host)
    return _getaddrinfo(host, *args, **kwargs)


def install() -> None:
    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo


if os.environ.get("IMAGEBROKER_NETGUARD_LOG"):
    install()
