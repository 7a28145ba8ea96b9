"""The image store: image bytes by their SHA-256, written once and never changed.

A folder in the user data dir by default; any fsspec URL (`s3://`, `gs://`, `memory://`, a shared path)
for a team, from the policy's `store.url` or $IMAGEBROKER_STORE_URL. An object lives at `ab/abcdef...`
(its hash, fanned out by the first two characters); what is read back is checked against its name, so a
damaged object is never served as an image. `gc` removes objects older than the retention."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from platformdirs import user_data_dir

from ..errors import ConfigError, MissingExtra
from ..logs import logger

STORE_ENV = "IMAGEBROKER_STORE_URL"
HEX = frozenset("0123456789abcdef")
TIME_KEYS = ("mtime", "created", "LastModified", "last_modified", "updated", "timeCreated")


def default_store_url() -> str:
    return str(Path(user_data_dir("imagebroker", appauthor=False)) / "images")


def store_url(url: str | None = None) -> str:
    return url or os.environ.get(STORE_ENV) or default_store_url()


def _checked(sha: str) -> str:
    if len(sha) != 64 or not HEX.issuperset(sha):
        raise ConfigError(f"{sha!r} is not a SHA-256 (64 lowercase hex digits)")
    return sha


class ImageStore:
    """Image bytes by SHA-256, on a local folder or an fsspec filesystem."""

    def __init__(self, url: str | None = None) -> None:
        self.url = store_url(url)
        self._fs: Any = None
        if "://" in self.url and not self.url.startswith("file://"):
            try:
                import fsspec
            except ImportError:
                raise MissingExtra("store", "fsspec") from None
            try:
                self._fs, self.root = fsspec.core.url_to_fs(self.url)
            except (ValueError, ImportError) as exc:
                raise ConfigError(f"store URL {self.shown_url!r} is not usable: {type(exc).__name__}") from None
        else:
            self.root = self.url.removeprefix("file://")

    def __repr__(self) -> str:
        return f"ImageStore({self.shown_url!r})"

    @property
    def shown_url(self) -> str:
        """The URL as it may be printed or recorded: without a password in it."""
        return re.sub(r"(://[^/:@]*:)[^/@]*@", r"\1***@", self.url)

    @property
    def remote(self) -> bool:
        """Its reads and writes go over a network (an fsspec URL): off the event loop, then."""
        return self._fs is not None

    def location(self, sha: str) -> str:
        return f"{self.root.rstrip('/')}/{_checked(sha)[:2]}/{sha}"

    def put(self, data: bytes) -> str:
        """Store `data` (once: an object already there is left as it is) and return its SHA-256."""
        sha = hashlib.sha256(data).hexdigest()
        where = self.location(sha)
        if self._fs is not None:
            if not self._fs.exists(where):
                self._fs.makedirs(where.rsplit("/", 1)[0], exist_ok=True)
                self._fs.pipe_file(where, data)
            return sha
        path = Path(where)
        if path.exists():   # stored again now: retention counts from this time
            os.utime(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")   # whole or absent, never half
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return sha

    def get(self, sha: str) -> bytes | None:
        """The bytes stored under `sha`, or None when they are not there (or no longer match their hash)."""
        where = self.location(sha)
        try:
            data = self._fs.cat_file(where) if self._fs is not None else Path(where).read_bytes()
        except (FileNotFoundError, OSError):
            return None
        if hashlib.sha256(data).hexdigest() != sha:
            logger.warning("store object %s does not match its hash: not used", where)
            return None
        return data

    def has(self, sha: str) -> bool:
        where = self.location(sha)
        return bool(self._fs.exists(where)) if self._fs is not None else Path(where).is_file()

    def _objects(self) -> Iterator[tuple[str, float]]:
        """(location, stored at) of every object."""
        if self._fs is not None:
            for where, info in self._fs.find(self.root, detail=True).items():
                name = where.rsplit("/", 1)[-1]
                if len(name) == 64 and HEX.issuperset(name):
                    stamp = next((info[k] for k in TIME_KEYS if info.get(k)), None)
                    if stamp is None:   # no time to judge it by: kept, never taken for old
                        logger.warning("store object %s has no modification time: gc keeps it", where)
                        continue
                    yield where, stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)
            return
        root = Path(self.root)
        if root.is_dir():
            for path in root.glob("??/*"):
                if len(path.name) == 64 and HEX.issuperset(path.name):
                    yield str(path), path.stat().st_mtime

    def gc(self, keep_days: float, *, now: float | None = None) -> list[str]:
        """Remove every object stored more than `keep_days` ago; return the hashes removed."""
        cutoff = (now if now is not None else time.time()) - keep_days * 86_400
        removed = []
        for where, stamp in list(self._objects()):
            if stamp < cutoff:
                if self._fs is not None:
                    self._fs.rm_file(where)
                else:
                    Path(where).unlink(missing_ok=True)
                removed.append(where.rsplit("/", 1)[-1])
        return removed

    def count(self) -> int:
        return sum(1 for _ in self._objects())
