"""The real `imagebroker` command run as a person runs it: its own process, in a pseudo-terminal of a given
width (what Rich measures, as on a real terminal), or with its output piped."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
COMMAND = [sys.executable, "-m", "imagebroker"]


def command_env(**extra: str) -> dict[str, str]:
    """This process's environment (the test's ledger, cleared keys) without a width of its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update(TERM="xterm-256color", **extra)
    return env


@dataclass
class Screen:
    code: int
    raw: str
    seconds_after_signal: float | None = None

    @property
    def text(self) -> str:
        """What the terminal shows at the end, line by line: colours removed, and of each line redrawn
        with a carriage return (a spinner) only its last drawing."""
        lines = ANSI.sub("", self.raw).replace("\r\n", "\n").split("\n")
        return "\n".join(line.rsplit("\r", 1)[-1] for line in lines)

    @property
    def lines(self) -> list[str]:
        return self.text.split("\n")


def in_terminal(args: Sequence[str], *, cols: int = 80, env: dict[str, str] | None = None,
                interrupt_when: Callable[[str], bool] | None = None, timeout: float = 120) -> Screen:
    """Run `imagebroker ARGS` on a pseudo-terminal `cols` wide. With `interrupt_when`, Ctrl-C (SIGINT, as
    the terminal sends it) goes to the process the first time the output so far satisfies it."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
    proc = subprocess.Popen([*COMMAND, *args], stdin=slave, stdout=slave, stderr=slave,
                            env=env or command_env(), close_fds=True)
    os.close(slave)
    out, sent, deadline = b"", None, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:   # the process is gone and the terminal closed
                    break
                if not chunk:
                    break
                out += chunk
            if interrupt_when is not None and sent is None and interrupt_when(
                    ANSI.sub("", out.decode(errors="replace"))):
                proc.send_signal(signal.SIGINT)
                sent = time.monotonic()
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    after = None if sent is None else round(time.monotonic() - sent, 2)
    return Screen(code, out.decode(errors="replace"), after)


def piped(args: Sequence[str], *, env: dict[str, str] | None = None,
          timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `imagebroker ARGS` with stdout and stderr piped (as in `$(...)` or `| less`)."""
    return subprocess.run([*COMMAND, *args], env=env or command_env(), capture_output=True, text=True,
                          timeout=timeout)
