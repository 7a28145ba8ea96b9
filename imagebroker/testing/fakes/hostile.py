"""The hostile-URL steps the BFL, fal and Replicate fakes share. Each such fake has `elsewhere`, a
second listener on 127.0.0.1 (another port: another origin) that records every request reaching it:

    foreign_poll        the polling/status URL is on `elsewhere` (Replicate: `urls.get`, which its
                        client does not use)
    poll_redirect       the polling/status URL answers a redirect to `elsewhere` (BFL, fal)
    file_url            the result URL is file:///etc/passwd
    metadata_url        the result URL is http://169.254.169.254/latest/meta-data/ (never connect)
    redirects           the result URL redirects MAX_REDIRECTS times on the fake, then serves the image
    too_many_redirects  the result URL redirects MAX_REDIRECTS + 1 times
    redirect_away       the result URL redirects to `elsewhere`, which redirects back to the image
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from ...providers.http import MAX_REDIRECTS
from .base import FakeServer, Reply

FILE_URL = "file:///etc/passwd"
METADATA_URL = "http://169.254.169.254/latest/meta-data/"


def hop(req: dict[str, Any]) -> Reply | None:
    """`GET /hop?n=N&to=URL`: a redirect to `/hop?n=N-1&to=URL` (relative), at n=1 to URL itself."""
    if req["path"] != "/hop":
        return None
    n, to = int(req["query"]["n"][0]), req["query"]["to"][0]
    return Reply(302, b"", {"Location": to if n <= 1 else f"/hop?n={n - 1}&to={quote(to, safe='')}"})


class Elsewhere(FakeServer):
    """Another origin: records every request, answers `/hop` redirects and 404 to anything else."""

    name = "elsewhere"

    def is_generation(self, req: dict[str, Any]) -> bool:
        return False

    def other(self, req: dict[str, Any]) -> Reply:
        return hop(req) or super().other(req)


class HostileURLs(FakeServer):
    """The hostile-URL steps (see the module docstring), for fakes whose answers name URLs."""

    def __init__(self, script: list[str] | None = None, port: int = 0) -> None:
        super().__init__(script, port)
        self.elsewhere = Elsewhere()

    def hops(self, n: int, to: str) -> str:
        return f"{self.url}/hop?n={n}&to={quote(to, safe='')}"

    def poll_url(self, step: str, url: str) -> str:
        """The polling/status URL to answer with: `url` (on this fake), unless the step says otherwise."""
        if step == "foreign_poll":
            return url.replace(self.url, self.elsewhere.url, 1)
        if step == "poll_redirect":
            return self.hops(1, url.replace(self.url, self.elsewhere.url, 1))
        return url

    def result_url(self, step: str, url: str) -> str:
        """The result URL to answer with: `url` (on this fake), unless the step says otherwise."""
        if step == "file_url":
            return FILE_URL
        if step == "metadata_url":
            return METADATA_URL
        if step == "redirects":
            return self.hops(MAX_REDIRECTS, url)
        if step == "too_many_redirects":
            return self.hops(MAX_REDIRECTS + 1, url)
        if step == "redirect_away":
            return self.hops(1, f"{self.elsewhere.url}/hop?n=1&to={quote(url, safe='')}")
        return url

    def other(self, req: dict[str, Any]) -> Reply:
        return hop(req) or super().other(req)

    def __enter__(self) -> HostileURLs:
        self.elsewhere.__enter__()
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.elsewhere.__exit__(*exc)
