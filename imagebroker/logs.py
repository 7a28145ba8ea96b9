"""imagebroker logs on one logger, `logging.getLogger("imagebroker")`, and every record it emits is
redacted: the message, its arguments and any traceback, against every credential a provider has read.

Levels: DEBUG for each attempt, settlement and ledger write; INFO for retries (with the wait), skips
and fallbacks; WARNING for usage not believed and other money surprises; ERROR for adapter bugs (with
the traceback). The library adds no handler (the application decides); the CLI's `-v`/`-vv` do.
"""

from __future__ import annotations

import logging
import sys
import threading

from .errors import redact

logger = logging.getLogger("imagebroker")
GATEWAY_LOG_ENV = "IMAGEBROKER_GATEWAY_LOG"   # set by `imagebroker serve`: "access" (a line per request) or "warnings"
_secrets: set[str] = set()
_lock = threading.Lock()


def remember_secret(value: str | None) -> None:
    """A credential read from the environment: from now on it is masked in every log record."""
    if value and len(value) >= 4 and value not in _secrets:
        with _lock:
            _secrets.add(value)


def known_secrets() -> list[str]:
    return list(_secrets)


class RedactingFilter(logging.Filter):
    """Formats each record once, masks the secrets in the text and the traceback, and hands the
    handlers only the masked strings."""

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = known_secrets()
        if not secrets or getattr(record, "_redacted", False):   # (the logger's filter, then its handler's)
            return True
        record._redacted = True  # type: ignore[attr-defined]
        record.msg, record.args = redact(record.getMessage(), secrets), None
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text, record.exc_info = redact(text, secrets), None
        if record.stack_info:
            record.stack_info = redact(record.stack_info, secrets)
        return True


logger.addFilter(RedactingFilter())


def _stderr_handler() -> logging.Handler:
    """One handler to stderr, redacting at the handler too: a logger's own filter does not see the records
    of its children (`imagebroker.gateway`), which reach this handler by propagation."""
    for h in logger.handlers:
        if getattr(h, "_imagebroker", False):
            return h
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(RedactingFilter())
    handler._imagebroker = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    return handler


def enable_cli_logging(verbosity: int) -> None:
    """`-v`: INFO, `-vv`: DEBUG, to stderr."""
    if verbosity <= 0:
        return
    _stderr_handler()
    logger.setLevel(logging.DEBUG if verbosity > 1 else logging.INFO)


def enable_gateway_logging(access: bool) -> None:
    """A gateway worker's logs to stderr: warnings and above (more with -v), and with `access` one line per
    request (`imagebroker.gateway.access`). Called in each worker process, which inherits no handler."""
    _stderr_handler()
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)
    if access:
        logging.getLogger("imagebroker.gateway.access").setLevel(logging.INFO)
