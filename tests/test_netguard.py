"""The network guard holds: no provider's real host can be reached from the test session, in this
process or in one a test starts, while loopback works."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from imagebroker.providers.catalog import builtin_catalog
from imagebroker.providers.registry import provider_class, provider_names
from imagebroker.testing.fake_http import FakeImageServer


def real_hosts() -> list[str]:
    """Every host a registered provider or a built-in offering would call by default."""
    urls = {provider_class(n).default_base_url for n in provider_names()}
    for o in builtin_catalog():
        urls |= {opt.base_url for opt in o.region_options.values()}
        urls.add(o.settings.get("base_url"))  # type: ignore[arg-type]
    return sorted({urlparse(u).hostname for u in urls if u and urlparse(u).hostname})


@pytest.fixture
def own_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "guard.log"
    monkeypatch.setenv("IMAGEBROKER_NETGUARD_LOG", str(log))  # this test's refusals, not the session's
    return log


def test_every_real_provider_host_is_unreachable(own_log: Path) -> None:
    hosts = real_hosts()
    assert {"api.openai.com", "api.bfl.ai", "queue.fal.run"} <= set(hosts)
    for host in hosts:
        with pytest.raises(httpx.ConnectError, match="network guard"):
            httpx.get(f"https://{host}/", timeout=2)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("93.184.216.34", 443), timeout=2)  # an address, not a name
    assert len(own_log.read_text().splitlines()) == 2 * len(hosts)


def test_a_process_the_tests_start_is_guarded_too(own_log: Path) -> None:
    code = ("import httpx\ntry:\n    httpx.get('https://api.openai.com/v1/models', timeout=2)\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "network guard" in out.stdout, out.stdout + out.stderr
    assert "api.openai.com" in own_log.read_text()


def test_loopback_is_allowed() -> None:
    with FakeImageServer(["ok"]) as server:
        assert httpx.post(f"{server.url}/v1/generate", json={"n": 1}).status_code == 200
