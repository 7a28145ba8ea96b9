"""The one error tree. Provider adapters translate their backend's failures into it, once, at the boundary.

    ImageBrokerError
    ├── ConfigError            bad policy/catalog/settings: names file, line and field
    │   └── MissingExtra       an optional dependency is not installed: names the pip command
    ├── RequestError           invalid request (size not a multiple, n out of range, ...)
    │   └── DuplicateRequest   its idempotency key was already served (in another process)
    ├── NoRouteError           no offering satisfies the constraints; carries every rejection reason
    ├── BudgetExceeded         which budget, spent, reserved, limit
    ├── ProviderError          provider, offering, http status, provider request id, retryable
    │   ├── RateLimited        retry_after
    │   ├── ProviderUnavailable    5xx, connection, timeout
    │   ├── AuthError          missing/invalid key (offering skipped, not retried)
    │   ├── ContentRejected    moderation/safety refusal (not retried on the same provider)
    │   ├── ModelNotFound      retired or unknown model
    │   ├── BadProviderResponse    malformed body, zero/undecodable images
    │   ├── OutcomeUnknown     the request reached the provider, its answer did not reach us: maybe billed
    │   └── AdapterError       the adapter itself failed (a bug): not the provider's fault
    ├── AllAttemptsFailed      carries the attempts
    └── LedgerError            a call could not be recorded; carries its result when it succeeded

Whether an error is worth retrying on the same offering is decided here and nowhere else: the
`retryable` class attribute.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .types import Attempt, Rejection, Skip


class ImageBrokerError(Exception):
    """Base of every error imagebroker raises on purpose."""

    exit_code = 1


class ConfigError(ImageBrokerError):
    """A policy, catalog or setting is wrong. The message names the file, line and field."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.file, self.line, self.field = file, line, field
        where = ":".join(str(p) for p in (file, line) if p is not None)
        prefix = f"{where}: " if where else ""
        prefix += f"{field}: " if field else ""
        super().__init__(prefix + message)


class MissingExtra(ConfigError):
    """An optional dependency is missing; the message says what to install."""

    def __init__(self, extra: str, module: str) -> None:
        super().__init__(
            f"{module} is not installed; install it with: pip install 'imagebroker[{extra}]'"
        )
        self.extra = extra


class RequestError(ImageBrokerError):
    """The request itself is invalid; no offering could serve it."""

    exit_code = 2


class DuplicateRequest(RequestError):
    """A request whose `idempotency_key` another process (or an earlier run) already served. The
    ledger keeps image hashes, not images, so it cannot be answered again without paying again."""

    def __init__(self, message: str, request_id: str) -> None:
        super().__init__(message)
        self.request_id = request_id


class NoRouteError(ImageBrokerError):
    """No offering in the catalog satisfies the request and the policy."""

    exit_code = 2

    def __init__(self, message: str, rejections: Sequence[Rejection] = ()) -> None:
        self.rejections = tuple(rejections)
        lines = [message] + [f"  {r.offering}: {'; '.join(r.reasons)}" for r in self.rejections]
        super().__init__("\n".join(lines))


class BudgetExceeded(ImageBrokerError):
    """A call would take a budget over its limit."""

    def __init__(self, budget: str, *, spent: Decimal, reserved: Decimal, limit: Decimal,
                 needed: Decimal) -> None:
        self.budget, self.spent, self.reserved, self.limit, self.needed = (
            budget, spent, reserved, limit, needed)
        super().__init__(
            f"budget {budget!r} would be exceeded: spent ${spent} + reserved ${reserved} "
            f"+ this call ${needed} > limit ${limit}"
        )


class ProviderError(ImageBrokerError):
    """A provider failed. `retryable` says whether the same offering is worth another try."""

    retryable = False

    def __init__(self, message: str, *, provider: str | None = None, offering: str | None = None,
                 status: int | None = None, request_id: str | None = None) -> None:
        self.provider, self.offering, self.status, self.request_id = (
            provider, offering, status, request_id)
        self.attempts: tuple[Attempt, ...] = ()   # set when this error ends a call (a refusal)
        self.skipped: tuple[Skip, ...] = ()
        super().__init__(message)

    def describe(self) -> dict[str, Any]:
        return {"error": type(self).__name__, "message": str(self), "http_status": self.status,
                "provider_request_id": self.request_id}


class RateLimited(ProviderError):
    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ProviderUnavailable(ProviderError):
    """5xx, refused connections, resets and timeouts."""

    retryable = True


class AuthError(ProviderError):
    """Missing or invalid credentials."""


class ContentRejected(ProviderError):
    """The provider's moderation refused the prompt or the output."""


class ModelNotFound(ProviderError):
    """The model is retired or unknown to the provider."""


class BadProviderResponse(ProviderError):
    """The provider answered, but not with what was asked: malformed body, too few or broken images."""


class OutcomeUnknown(ProviderError):
    """The provider accepted the request (a job id, or a request fully sent) but its answer never came
    back: a timeout or a reset after sending, a job whose polling or download kept failing. It may
    have been billed, so it is recorded at the estimated cost and counted in budgets; asking again
    would be a second paid submit, so `retry.on_unknown_outcome` decides (default: the next offering)."""


class AdapterError(ProviderError):
    """A provider adapter raised something it did not translate into this tree (a `KeyError` on a
    response it did not expect): a bug in imagebroker or a plugin, not an outage. Logged with its
    traceback, counted apart in `costs`, and the call falls back to the next offering."""


class CallTimedOut(ImageBrokerError):
    """The whole call (fallbacks included) ran past the caller's `timeout`: it was cancelled, and its
    row says `cancelled`. Exit code 124, as `timeout(1)` uses."""

    exit_code = 124


class AllAttemptsFailed(ImageBrokerError):
    """Every planned offering failed or was skipped. `attempts` holds the tries in order, `skipped`
    the offerings passed over without a try (circuit open, price unknown, over budget, rate limited)."""

    def __init__(self, attempts: Sequence[Attempt], skipped: Sequence[Skip] = (), *,
                 retry_after: float | None = None) -> None:
        self.attempts, self.skipped = tuple(attempts), tuple(skipped)
        self.retry_after = retry_after   # nothing tried, every provider at its rate limit: when one frees
        lines = [f"all {len(self.attempts)} attempts failed:" if self.attempts else "nothing was tried:"]
        lines += [f"  {a.offering}: {a.error_type}: {a.error}" for a in self.attempts]
        lines += [f"  {s.offering}: skipped ({s.reason}): {s.detail}" for s in self.skipped]
        super().__init__("\n".join(lines))


_MASK = "***"
_MIN_SECRET = 4   # shorter values are not treated as secrets
_MIN_PIECE = 6    # a piece of a secret at least this long is masked too
_REDACTORS: dict[tuple[str | None, ...], _Redactor] = {}


def redact(text: str, secrets: Sequence[str | None]) -> str:
    """Replace every secret value in `text` (keys echoed back by a provider, say) with '***'.

    Masked, for each secret of at least 4 characters: the secret itself; its URL-encoded forms
    (`quote`, `quote_plus`, upper- or lower-case hex) and JSON-escaped forms (with `\\/` too); its
    base64, standard or URL-safe, alone or inside anything base64'd with it (`user:key` in a Basic
    header): the characters that depend only on the secret are found for each of the three byte
    alignments, and the one or two characters it shares with its neighbours go with them; and a
    piece of the secret at least 6 characters long that was cut off: a suffix of the text that
    begins the secret (an error body cut at 300 characters), a prefix of the text that ends it, or a
    whole word (a run of letters, digits, `-` and `_`) that is part of it. What can survive: a piece
    under 6 characters, or a piece glued inside a longer word in the middle of the text.

    It runs on every error message, so the forms are worked out once per set of secrets (cached),
    and a message costs one `str.find` per distinct form, two set lookups for the cut-off pieces and
    one regex pass over its words: for 300 characters and 8 secrets, about 13 us when no secret is
    in it and 25-30 us when one is, on a slow shared machine (where the exact-match loop it replaced
    took about 1 us).
    """
    if not text:
        return text
    key = tuple(secrets)
    redactor = _REDACTORS.get(key)
    if redactor is None:
        if len(_REDACTORS) >= 32:   # secrets come and go (a key set in a notebook): keep a few
            _REDACTORS.clear()
        redactor = _REDACTORS[key] = _Redactor(
            tuple(dict.fromkeys(s for s in secrets if s and len(s) >= _MIN_SECRET)))
    return redactor(text) if redactor.forms else text


class _Redactor:
    """`redact` for one set of secrets: every form precomputed (see `redact`)."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        import base64
        import json
        import re
        from urllib.parse import quote, quote_plus

        forms: set[str] = set()
        cores: list[tuple[str, bool, bool]] = []   # base64 core, shares a char on the left, right
        for s in secrets:
            # os.environ keeps bytes that are not UTF-8 as surrogates: encode them back as sent
            try:
                raw, errors = s.encode(errors="surrogateescape"), "surrogateescape"
            except UnicodeEncodeError:   # other lone surrogates: never sent as such, but no crash
                raw, errors = s.encode(errors="surrogatepass"), "surrogatepass"
            url = {quote(s, safe="", errors=errors), quote(s, errors=errors),
                   quote_plus(s, errors=errors)}
            url |= {re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), u) for u in url}
            js = {json.dumps(s)[1:-1], json.dumps(s, ensure_ascii=False)[1:-1]}
            forms |= {s, *url, *js, *(j.replace("/", "\\/") for j in js)}
            for shift in range(3):   # the secret's bytes start 0, 1 or 2 bytes into a 3-byte group
                enc = base64.urlsafe_b64encode(bytes(shift) + raw).decode().rstrip("=")
                partial_right = (shift + len(raw)) % 3 != 0
                core = enc[(0, 2, 3)[shift]:len(enc) - partial_right]
                if len(core) >= _MIN_PIECE:
                    cores.append((core, shift > 0, partial_right))
        urlsafe = str.maketrans("+/", "-_")
        self.forms = sorted(forms)
        self.form_grams = _grams(self.forms)
        self.cores = cores
        self.core_texts = [c for c, _, _ in cores]
        self.core_grams = _grams(self.core_texts)
        self.min_core = min(map(len, self.core_texts), default=1 << 30)
        # pieces of a secret as whole words, looked for in the text read as URL-safe base64 (below)
        self.joined = "\n".join(secrets).translate(urlsafe)
        self.grams = _grams(self.joined.split("\n"))
        self.words = re.compile(f"[A-Za-z0-9_-]{{{_MIN_PIECE},}}")
        self.urlsafe = urlsafe

    def __call__(self, text: str) -> str:
        spans: list[tuple[int, int]] = []
        for form in self.forms:
            i = text.find(form)
            while i >= 0:
                spans.append((i, i + len(form)))
                i = text.find(form, i + 1)
        # a piece cut off at an end of the text ends (starts) with 6 characters of some form
        if text[-_MIN_PIECE:] in self.form_grams:
            _cut_tail(text, self.forms, spans)
        if text[:_MIN_PIECE] in self.form_grams:
            _cut_head(text, self.forms, spans)
        # standard base64 read as URL-safe, at the same positions
        safe = text.translate(self.urlsafe) if "+" in text or "/" in text else text
        if safe[-_MIN_PIECE:] in self.core_grams:
            _cut_tail(safe, self.core_texts, spans)
        if safe[:_MIN_PIECE] in self.core_grams:
            _cut_head(safe, self.core_texts, spans)
        grams, joined, min_core = self.grams, self.joined, self.min_core
        if any(len(w) >= min_core or (w[:_MIN_PIECE] in grams and w in joined)
               for w in self.words.findall(safe)):   # rare: now find where
            for m in self.words.finditer(safe):
                word = m.group()
                if word[:_MIN_PIECE] in grams and word in joined:
                    spans.append(m.span())   # a word that is a piece of a secret
                if len(word) >= min_core:
                    self._base64(safe, m.start(), word, spans)
        if not spans:
            return text
        spans.sort()
        out, pos = [], 0
        start, end = spans[0]
        for s, e in spans[1:]:
            if s > end:
                out += (text[pos:start], _MASK)
                pos, start = end, s
            end = max(end, e)
        out += (text[pos:start], _MASK, text[end:])
        return "".join(out)

    def _base64(self, safe: str, at: int, word: str, spans: list[tuple[int, int]]) -> None:
        """Each base64 core in `word` (at `at` in the text), with the characters it shares with its
        neighbours and the padding after it."""
        for core, left, right in self.cores:
            i = word.find(core)
            while i >= 0:
                end = at + i + len(core) + (right and i + len(core) < len(word))
                while end < len(safe) and safe[end] == "=":
                    end += 1
                spans.append((at + i - (left and i > 0), end))
                i = word.find(core, i + 1)


def _grams(texts: list[str]) -> set[str]:
    return {t[i:i + _MIN_PIECE] for t in texts for i in range(len(t) - _MIN_PIECE + 1)}


def _cut_tail(text: str, forms: list[str], spans: list[tuple[int, int]]) -> None:
    """The longest suffix of `text`, at least _MIN_PIECE long, that starts one of `forms`."""
    n = len(text)
    for form in forms:
        first = form[:_MIN_PIECE]
        i = text.find(first, max(0, n - len(form) + 1))
        while i >= 0:
            if form.startswith(text[i:]):
                spans.append((i, n))
                break
            i = text.find(first, i + 1)


def _cut_head(text: str, forms: list[str], spans: list[tuple[int, int]]) -> None:
    """The longest prefix of `text`, at least _MIN_PIECE long, that ends one of `forms`."""
    for form in forms:
        last = form[-_MIN_PIECE:]
        j = text.rfind(last, 0, len(form) - 1)
        while j >= 0:
            if form.endswith(text[:j + _MIN_PIECE]):
                spans.append((0, j + _MIN_PIECE))
                break
            j = text.rfind(last, 0, j + _MIN_PIECE - 1)


class LedgerError(ImageBrokerError):
    """The ledger could not record a call (database gone, disk full, schema damaged). When the call
    itself succeeded, `result` holds it: the images were paid for and are not thrown away."""

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


class LedgerUnavailable(LedgerError):
    """The ledger could not be opened (no server behind its URL, a file that cannot be created): found
    before any call is made, so nothing was paid for. Exit code 2, like the setting it comes from."""

    exit_code = 2
