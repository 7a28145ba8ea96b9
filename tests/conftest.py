"""Shared fixtures. No test can reach a real provider: every key variable is cleared, and providers
are pointed at fakes on 127.0.0.1."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

KEY_VARS = ["OPENAI_API_KEY", "GEMINI_API_KEY", "REPLICATE_API_TOKEN", "FAL_KEY", "TOGETHER_API_KEY",
            "STABILITY_API_KEY", "BFL_API_KEY", "FAKEHTTP_API_KEY"]
PG_URL = os.environ.get("IMAGEBROKER_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in KEY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("IMAGEBROKER_POLICY", raising=False)
    monkeypatch.setenv("IMAGEBROKER_LEDGER_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
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


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("pg_url")


def mock_policy(*offerings: dict[str, Any], **extra: Any) -> Any:
    """A policy whose only offerings are the given mock/fakehttp ones (all built-ins denied)."""
    from imagebroker.policies.schema import Policy

    deny = ["openai", "google", "replicate", "fal", "together", "stability", "bfl", "comfyui", "local"]
    return Policy.model_validate({"name": "test", "deny": deny, "offerings": list(offerings), **extra})
