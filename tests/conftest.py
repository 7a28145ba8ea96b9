"""Shared fixtures. No test can reach a real provider, by construction: every provider's key variable
(read from the provider registry) is cleared, providers are pointed at fakes on 127.0.0.1, and the
network guard (tests/netguard/sitecustomize.py, also loaded by every Python process a test starts)
refuses any connection or name lookup that is not loopback, failing the test that tried."""

from __future__ import annotations

import io
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

GUARD = Path(__file__).parent / "netguard"
_guard_log = Path(tempfile.mkstemp(prefix="imagebroker-netguard-", suffix=".log")[1])
os.environ["IMAGEBROKER_NETGUARD_LOG"] = str(_guard_log)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(GUARD), os.environ.get("PYTHONPATH")) if p)
sys.path.insert(0, str(GUARD))
import netguard  # noqa: E402  (the guard, for this process too)

netguard.install()

from imagebroker.providers.catalog import builtin_catalog  # noqa: E402
from imagebroker.providers.registry import provider_class, provider_names  # noqa: E402

KEY_VARS = sorted({v for name in provider_names() if (v := provider_class(name).api_key_env)})
PG_URL = os.environ.get("IMAGEBROKER_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def builtin_providers(*keep: str) -> list[str]:
    """Every provider the built-in catalog has offerings for, but `keep` (for a policy's `deny`)."""
    return [p for p in builtin_catalog().providers() if p not in keep]


@pytest.fixture(autouse=True)
def _network_guard() -> Iterator[None]:
    before = _guard_log.stat().st_size
    yield
    with _guard_log.open(encoding="utf-8") as f:
        f.seek(before)
        tried = f.read().strip()
    if tried:
        pytest.fail(f"the test tried to leave this machine:\n{tried}", pytrace=False)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in KEY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("IMAGEBROKER_POLICY", raising=False)
    monkeypatch.setenv("IMAGEBROKER_LEDGER_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    monkeypatch.delenv("IMAGEBROKER_STORE_URL", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))   # the CLI's image store, and anything else kept
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


def _pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_URL.replace("+psycopg", ""), connect_timeout=3):
            return True
    except Exception:
        return False


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh schema on the local PostgreSQL server, dropped afterwards."""
    if not _pg_available():
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}")
    import psycopg

    schema = f"ib_{uuid.uuid4().hex[:10]}"
    raw = PG_URL.replace("+psycopg", "")
    with psycopg.connect(raw, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(raw, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


REDIS_URL = os.environ.get("IMAGEBROKER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_state() -> Iterator[dict[str, str]]:
    """The `state:` section of a policy on the local Redis server, under a prefix of its own, deleted afterwards."""
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip(f"Redis not reachable at {REDIS_URL}")
    prefix = f"ibtest-{uuid.uuid4().hex[:10]}"
    try:
        yield {"url": REDIS_URL, "prefix": prefix}
    finally:
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
        client.close()


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("pg_url")


def mock_policy(*offerings: dict[str, Any], **extra: Any) -> Any:
    """A policy whose only offerings are the given mock/fakehttp ones (all built-ins denied)."""
    from imagebroker.policies.schema import Policy

    return Policy.model_validate({"name": "test", "deny": builtin_providers(), "offerings": list(offerings),
                                  **extra})


def png(size: tuple[int, int], colour: tuple[int, ...] = (200, 30, 30), mode: str = "RGB") -> bytes:
    """A plain PNG of this size: an input image for edits."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def left_half_mask(size: tuple[int, int]) -> bytes:
    """White (change) on the left half, black (keep) on the right: imagebroker's convention."""
    from PIL import Image

    image = Image.new("L", size, 0)
    image.paste(255, (0, 0, size[0] // 2, size[1]))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
