"""The fast state that every worker of a gateway must see alike: circuit breakers, provider rate limits
and calls under way by idempotency key.

`LocalState` keeps it in this process (the default: one process, or workers that each keep their own).
`RedisState` keeps it in Redis when `state.url: redis://...` (or $IMAGEBROKER_STATE_URL) is set, so that a
provider whose circuit opened on one worker is skipped on all of them, a rate limit of R requests a minute is
R for the whole fleet, and a repeat of an Idempotency-Key on another worker waits for the call under way
instead of paying for it again. Each Redis step is one Lua script (atomic, on Redis's own clock, so hosts
whose clocks differ agree). While Redis cannot be reached, a call goes on with this process's own state and
a warning is logged: state shared by nobody is better than no calls at all.

What must not be lost (budgets, keys, jobs, the ledger) is never here: that lives in the ledger's database.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from ..errors import ConfigError, MissingExtra
from ..logs import logger
from ..policies.schema import Policy
from ..providers.settings import RateLimit
from .breaker import CircuitBreaker

STATE_ENV = "IMAGEBROKER_STATE_URL"
WINDOW_S = 60.0             # an rpm limit counts the requests sent in the last minute
POLL_S = 0.025              # how often a call waiting for a concurrency slot looks again (plus jitter)
LEASE_MARGIN_S = 30.0       # a slot held by a process that died frees this long after its call's timeout


class SharedState(Protocol):
    where: str     # "this process", or the Redis URL without its password
    shared: bool   # other processes see it

    async def allow(self, provider: str) -> bool: ...
    async def success(self, provider: str) -> None: ...
    async def failure(self, provider: str) -> None: ...
    async def is_open(self, provider: str) -> bool: ...
    async def take(self, provider: str, limit: RateLimit, token: str, lease_s: float) -> float: ...
    async def give_back(self, provider: str, token: str) -> None: ...
    async def claim(self, key: str, owner: str, ttl_s: float) -> bool: ...
    async def extend(self, key: str, owner: str, ttl_s: float) -> None: ...
    async def unclaim(self, key: str, owner: str) -> None: ...
    async def claimed(self, key: str) -> bool: ...
    async def ping(self) -> None: ...
    async def aclose(self) -> None: ...


def shared_state(policy: Policy) -> SharedState:
    """The state a broker under `policy` uses: Redis when its `state.url` (or $IMAGEBROKER_STATE_URL) names
    one, else this process's own."""
    settings = policy.state
    url = settings.url or os.environ.get(STATE_ENV)
    local = LocalState(policy.breaker.failure_threshold, policy.breaker.cooldown_s, policy.timeout_s)
    if not url:
        return local
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"state.url must be a redis://, rediss:// or unix:// URL, not {_safe(url)!r}",
                          field="state.url")
    return RedisState(url, settings.prefix, local)


# -- this process ---------------------------------------------------------------------------------
@dataclass
class LocalState:
    """Breakers, rate limits and claims of this process alone."""

    failure_threshold: int
    cooldown_s: float
    probe_lease_s: float
    where: str = "this process"
    shared: bool = False
    breaker: CircuitBreaker = field(init=False)
    _sent: dict[str, deque[float]] = field(default_factory=dict)          # provider -> send times, last minute
    _running: dict[str, dict[str, float]] = field(default_factory=dict)   # provider -> token -> lease end

    def __post_init__(self) -> None:
        self.breaker = CircuitBreaker(self.failure_threshold, self.cooldown_s, probe_lease_s=self.probe_lease_s)

    async def allow(self, provider: str) -> bool:
        return self.breaker.allow(provider)

    async def success(self, provider: str) -> None:
        self.breaker.success(provider)

    async def failure(self, provider: str) -> None:
        self.breaker.failure(provider)

    async def is_open(self, provider: str) -> bool:
        return self.breaker.is_open(provider)

    async def take(self, provider: str, limit: RateLimit, token: str, lease_s: float) -> float:
        now = time.monotonic()
        wait = 0.0
        running = self._running.setdefault(provider, {})
        if limit.concurrency:
            for t in [t for t, until in running.items() if until <= now]:
                del running[t]
            if len(running) >= limit.concurrency:
                wait = POLL_S
        sent = self._sent.setdefault(provider, deque())
        if limit.rpm:
            while sent and sent[0] <= now - WINDOW_S:
                sent.popleft()
            if len(sent) >= limit.rpm:
                wait = max(wait, sent[0] + WINDOW_S - now)
        if wait > 0:
            return wait
        if limit.rpm:
            sent.append(now)
        if limit.concurrency:
            running[token] = now + lease_s
        return 0.0

    async def give_back(self, provider: str, token: str) -> None:
        self._running.get(provider, {}).pop(token, None)

    async def claim(self, key: str, owner: str, ttl_s: float) -> bool:
        return True   # within one process the broker's own table already joins repeats of a key

    async def extend(self, key: str, owner: str, ttl_s: float) -> None:
        return None

    async def unclaim(self, key: str, owner: str) -> None:
        return None

    async def claimed(self, key: str) -> bool:
        return False

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


# -- Redis --------------------------------------------------------------------------------------------
_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1000000 "

# KEYS: the provider's breaker hash; ARGV[1]: the failure threshold. `tripped`: enough failures in a row;
# `blocked`: tripped, and cooling down or probing
_BREAKER = _NOW + """
local state = redis.call('HMGET', KEYS[1], 'failures', 'open_until', 'probe_until')
local tripped = tonumber(state[1] or '0') >= tonumber(ARGV[1])
local blocked = tripped and (now < tonumber(state[2] or '0') or now < tonumber(state[3] or '0'))
"""

_ALLOW = _BREAKER + """
if not tripped then return 1 end
if blocked then return 0 end
redis.call('HSET', KEYS[1], 'probe_until', tostring(now + tonumber(ARGV[2])))
return 1
"""

_IS_OPEN = _BREAKER + """
if blocked then return 1 end
return 0
"""

_FAILURE = _NOW + """
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
redis.call('HDEL', KEYS[1], 'probe_until')
if failures >= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'open_until', tostring(now + tonumber(ARGV[2])))
end
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 3600)
return failures
"""

# KEYS: the provider's sends of the last minute, its calls under way; ARGV: rpm, concurrency (0: no limit),
# token, lease. '0' when the slot is taken, else the seconds to wait (a string: Lua numbers reach Redis as
# integers).
_TAKE = _NOW + """
local rpm, conc, wait = tonumber(ARGV[1]), tonumber(ARGV[2]), 0
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= conc then wait = tonumber(ARGV[5]) end
end
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[6]))
  if redis.call('ZCARD', KEYS[1]) >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    wait = math.max(wait, tonumber(oldest[2]) + tonumber(ARGV[6]) - now)
  end
end
if wait > 0 then return tostring(wait) end
if rpm > 0 then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[6])) + 1)
end
if conc > 0 then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[3])
  redis.call('EXPIRE', KEYS[2], math.ceil(tonumber(ARGV[4])) + 1)
end
return '0'
"""

_UNCLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class RedisState:
    """Breakers, rate limits and claims in Redis, shared by every process that names the same URL and
    prefix."""

    shared = True

    def __init__(self, url: str, prefix: str, fallback: LocalState) -> None:
        """`fallback`: this process's own state, used while Redis cannot be reached; its breaker settings are
        the ones kept in Redis too."""
        try:
            import redis.asyncio as aioredis
        except ImportError:
            raise MissingExtra("redis", "redis") from None
        self.where = _safe(url)
        self._prefix = prefix
        self._local = fallback
        self._errors: tuple[type[BaseException], ...] = (aioredis.RedisError, OSError)
        self._redis: Any = aioredis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._allow, self._failure, self._is_open, self._take, self._unclaim, self._extend = (
            self._redis.register_script(s) for s in (_ALLOW, _FAILURE, _IS_OPEN, _TAKE, _UNCLAIM, _EXTEND))
        self._warned_at = -1e9

    def __repr__(self) -> str:
        return f"<RedisState {self.where}>"

    def _key(self, *parts: str) -> str:
        return ":".join((self._prefix, *parts))

    async def _run(self, what: str, step: Any, local: Callable[[], Awaitable[Any]]) -> Any:
        """One Redis step; while Redis cannot be reached, this process's own state answers instead."""
        try:
            return await step
        except self._errors as exc:
            if time.monotonic() - self._warned_at > 30:   # once in a while, not on every call
                self._warned_at = time.monotonic()
                logger.warning("shared state at %s unreachable (%s: %s); %s uses this process's own until it "
                               "is back", self.where, type(exc).__name__, exc, what)
            return await local()

    async def allow(self, provider: str) -> bool:
        got = await self._run("the circuit breaker", self._allow(
            keys=[self._key("breaker", provider)], args=[self._local.failure_threshold, self._local.probe_lease_s]),
            lambda: self._local.allow(provider))
        return bool(int(got))

    async def success(self, provider: str) -> None:
        await self._run("the circuit breaker", self._redis.delete(self._key("breaker", provider)),
                        lambda: self._local.success(provider))

    async def failure(self, provider: str) -> None:
        await self._run("the circuit breaker", self._failure(
            keys=[self._key("breaker", provider)], args=[self._local.failure_threshold, self._local.cooldown_s]),
            lambda: self._local.failure(provider))

    async def is_open(self, provider: str) -> bool:
        got = await self._run("the circuit breaker", self._is_open(
            keys=[self._key("breaker", provider)], args=[self._local.failure_threshold]),
            lambda: self._local.is_open(provider))
        return bool(int(got))

    async def take(self, provider: str, limit: RateLimit, token: str, lease_s: float) -> float:
        keys = [self._key("rate", provider, "sent"), self._key("rate", provider, "running")]
        got = await self._run("the rate limit", self._take(
            keys=keys, args=[limit.rpm or 0, limit.concurrency or 0, token, lease_s, POLL_S, WINDOW_S]),
            lambda: self._local.take(provider, limit, token, lease_s))
        return float(got)

    async def give_back(self, provider: str, token: str) -> None:
        await self._run("the rate limit", self._redis.zrem(self._key("rate", provider, "running"), token),
                        lambda: self._local.give_back(provider, token))

    async def claim(self, key: str, owner: str, ttl_s: float) -> bool:
        got = await self._run("idempotency", self._redis.set(
            self._key("claim", key), owner, nx=True, px=int(ttl_s * 1000)),
            lambda: self._local.claim(key, owner, ttl_s))
        return bool(got)

    async def extend(self, key: str, owner: str, ttl_s: float) -> None:
        await self._run("idempotency", self._extend(keys=[self._key("claim", key)], args=[owner, int(ttl_s * 1000)]),
                        lambda: self._local.extend(key, owner, ttl_s))

    async def unclaim(self, key: str, owner: str) -> None:
        await self._run("idempotency", self._unclaim(keys=[self._key("claim", key)], args=[owner]),
                        lambda: self._local.unclaim(key, owner))

    async def claimed(self, key: str) -> bool:
        got = await self._run("idempotency", self._redis.exists(self._key("claim", key)),
                              lambda: self._local.claimed(key))
        return bool(got)

    async def ping(self) -> None:
        """Raises when Redis cannot be reached (what /readyz asks)."""
        await self._redis.ping()

    async def aclose(self) -> None:
        await self._redis.aclose()


def _safe(url: str) -> str:
    """The URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=f"{user}{host}{port}").geturl()


# -- waiting for a turn -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Turn:
    """A rate-limited provider's slot: `token` to give back when the request ends, or None with
    `retry_after`, the seconds until one is likely to free, when none came within the wait allowed."""

    token: str | None
    waited_s: float
    retry_after: float = 0.0


async def wait_turn(state: SharedState, provider: str, limit: RateLimit, wait_up_to: float) -> Turn:
    """Wait until `limit` lets one more request to `provider` go, at most `wait_up_to` seconds."""
    token, t0 = uuid.uuid4().hex, time.monotonic()
    lease = wait_up_to + LEASE_MARGIN_S
    while True:
        wait = await state.take(provider, limit, token, lease)
        waited = time.monotonic() - t0
        if wait <= 0:
            return Turn(token, waited)
        if waited + wait > wait_up_to:   # no slot in time: say so now rather than sleep for nothing
            return Turn(None, waited, retry_after=wait)
        await asyncio.sleep(wait + random.uniform(0, POLL_S))
