"""`redact` masks a secret in every form an error message is likely to carry it: as is, URL-encoded,
JSON-escaped, base64'd (alone or in `user:key`), and cut off by a length limit at either end."""

from __future__ import annotations

import base64
import json
import re
import sys
import timeit
from collections.abc import Callable
from urllib.parse import quote, quote_plus, unquote, unquote_plus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imagebroker.errors import redact

KEY = "sk-proj-Ab3/x+Yz_9=Qr:T7\"w\\e-é0Lm"   # every character an encoder treats specially
OTHERS = ["r8_" + "k" * 37, "fal-" + "Zq9" * 12, None, "", "abc"]   # the short ones are ignored


def pieces(secret: str, n: int = 6) -> set[str]:
    return {secret[i:i + n] for i in range(len(secret) - n + 1)}


def leaked(out: str, secret: str = KEY) -> set[str]:
    return {p for p in pieces(secret) if p in out}


def b64_decodings(out: str) -> list[bytes]:
    """Everything an attacker could decode from the base64-looking runs of `out`, at any alignment."""
    found = []
    for run in re.findall(r"[A-Za-z0-9+/_=-]+", out):
        run = run.replace("-", "+").replace("_", "/").replace("=", "")
        for offset in range(4):
            chunk = run[offset:]
            chunk = chunk[:len(chunk) - (len(chunk) % 4 == 1)]
            found.append(base64.b64decode(chunk + "=" * (-len(chunk) % 4)))
    return found


def b64_leaked(out: str, secret: str = KEY) -> set[bytes]:
    raw = secret.encode()
    windows = {raw[i:i + 6] for i in range(len(raw) - 5)}
    return {w for d in b64_decodings(out) for w in windows if w in d}


ENCODINGS: dict[str, Callable[[str], str]] = {
    "exact": lambda k: k,
    "quote": lambda k: quote(k, safe=""),
    "quote-default-safe": quote,
    "quote-lower-hex": lambda k: re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), quote(k, safe="")),
    "quote_plus": quote_plus,
    "json": lambda k: json.dumps(k)[1:-1],
    "json-unicode": lambda k: json.dumps(k, ensure_ascii=False)[1:-1],
    "json-escaped-slash": lambda k: json.dumps(k)[1:-1].replace("/", "\\/"),
}


@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_each_text_encoding_of_a_key_is_masked(name: str):
    encoded = ENCODINGS[name](KEY)
    out = redact(f'HTTP 401: {{"detail": "bad key {encoded}", "url": "/v1?key={encoded}&x=1"}}',
                 [*OTHERS, KEY])
    assert encoded not in out and not leaked(out)
    assert not leaked(unquote(out)) and not leaked(unquote_plus(out))
    assert out.count("***") == 2 and out.startswith('HTTP 401: {"detail": "bad key ***"')


@pytest.mark.parametrize("wrap", ["{k}", "user:{k}", "{k}:", "api:{k}:x", "ab{k}", "Bearer {k}"])
@pytest.mark.parametrize("encode", [base64.b64encode, base64.urlsafe_b64encode])
def test_base64_of_a_key_alone_or_wrapped_is_masked(wrap: str, encode):
    blob = encode(wrap.format(k=KEY).encode()).decode()
    out = redact(f"upstream rejected Authorization: Basic {blob} (401)", [KEY])
    assert not b64_leaked(out), out
    assert out.startswith("upstream rejected Authorization: Basic ") and out.endswith(" (401)")


def test_a_key_cut_by_the_300_character_error_limit_is_masked():
    body = '{"error": {"message": "invalid token", "token": "' + KEY + '"}}'
    for cut in range(6, len(KEY)):
        text = "x" * (300 - body.index(KEY) - cut) + body
        message = f"HTTP 401: {text[:300]}"   # as providers/http.py words it
        assert message.endswith(KEY[:cut])
        out = redact(message, [KEY])
        assert not leaked(out) and out.endswith("***"), (cut, out)


def test_a_message_that_starts_inside_a_key_is_masked():
    for cut in range(6, len(KEY)):
        out = redact(KEY[-cut:] + '" was rejected', [KEY])
        assert out == '***" was rejected', out


def test_a_word_that_is_a_piece_of_a_key_is_masked_anywhere():
    key = "sk-" + "Qm7vX2pL9wR4tZ8yB1nC6"
    assert redact(f"key {key[:14]}... is invalid", [key]) == "key ***... is invalid"
    assert redact(f"ends in {key[-9:]}, retry", [key]) == "ends in ***, retry"


def test_a_piece_under_six_characters_is_kept():
    """Five characters of a key are not worth masking words of the message for."""
    assert redact("a prefix sk-pr", ["sk-proj-abcdefghijkl"]) == "a prefix sk-pr"


def test_text_without_secrets_is_unchanged():
    text = ('HTTP 429: {"error": "rate limited", "retry_after": 2} /v1/images/generations?x=a+b '
            "aGVsbG8gd29ybGQ= req_0123456789abcdef0123456789abcdef")
    assert redact(text, [KEY, *OTHERS]) == text
    assert redact(text, []) == text and redact(text, [None, "", "abc"]) == text
    assert redact("", [KEY]) == ""


def test_several_secrets_and_several_forms_in_one_message():
    other = OTHERS[0]
    text = f"{KEY} then {quote(other)} then {base64.b64encode(other.encode()).decode()}=="
    out = redact(text, [KEY, other])
    assert out == "*** then *** then ***"


def test_short_values_are_not_secrets():
    assert redact("abc and abcd", ["abc"]) == "abc and abcd"
    assert redact("abc and abcd", ["abcd"]) == "abc and ***"


@pytest.mark.skipif(sys.gettrace() is not None, reason="timing under a tracer (coverage) means nothing")
def test_redact_is_fast_enough_to_run_on_every_error():
    secrets = [KEY, *(f"k{i}-" + "Zq9xW2" * 7 for i in range(7))]
    message = ('HTTP 401: {"error": {"message": "Incorrect API key provided. You can find your API key '
               'at https://platform.openai.com/account/api-keys.", "type": "invalid_request_error", '
               '"code": "invalid_api_key"}}, request id req_8f0a1b2c3d4e5f60718293a4b5c6d7e8, while '
               "calling images/generations")[:300]
    redact(message, secrets)
    per_call = min(timeit.repeat(lambda: redact(message, secrets), number=500, repeat=5)) / 500
    assert per_call < 200e-6   # about 20 us on a slow shared machine; the bound leaves room


KEY_CHARS = st.text(alphabet="abcXYZ0189-_./+=:\"\\é", min_size=8, max_size=64)
AROUND = st.text(alphabet=" ,;!?()[]{}<>|~#…ß", max_size=40)   # shares no character with a key


@settings(max_examples=150, deadline=None)
@given(key=KEY_CHARS, pre=AROUND, post=AROUND, others=st.lists(KEY_CHARS, max_size=7),
       form=st.sampled_from(sorted(ENCODINGS)))
def test_no_piece_of_a_key_survives_any_text_encoding(key, pre, post, others, form):
    out = redact(pre + ENCODINGS[form](key) + post, [*others, key])
    assert not leaked(out, key)
    assert not leaked(unquote(out), key) and not leaked(unquote_plus(out), key)
    if form.startswith("json"):
        assert not leaked(json.loads('"' + out + '"'), key)


@settings(max_examples=150, deadline=None)
@given(key=KEY_CHARS, pre=KEY_CHARS | AROUND, post=KEY_CHARS | AROUND, data=st.data(),
       form=st.sampled_from([*sorted(ENCODINGS), "cut", "starts inside"]))
def test_what_survives_is_only_what_the_surrounding_text_has_itself(key, pre, post, data, form):
    """The same with text made of the key's own characters: any piece of the key left in the output
    was in the text around it, not in the key's encoding (masking a little of it is allowed)."""
    if form in ENCODINGS:
        text = pre + ENCODINGS[form](key) + post
    else:
        cut = data.draw(st.integers(6, len(key) - 1))
        text = pre + key[:cut] if form == "cut" else key[-cut:] + post
    out = redact(text, [key])
    assert "***" in out
    assert all(p in pre or p in post for p in leaked(out, key)), out


@settings(max_examples=150, deadline=None)
@given(key=KEY_CHARS, pre=AROUND, post=AROUND, user=st.sampled_from(["", "user:", "ab", "api_key="]),
       suffix=st.sampled_from(["", ":", "\n"]), urlsafe=st.booleans())
def test_no_piece_of_a_key_survives_base64(key, pre, post, user, suffix, urlsafe):
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    out = redact(pre + encode((user + key + suffix).encode()).decode() + post, [key])
    assert not b64_leaked(out, key), out


@settings(max_examples=150, deadline=None)
@given(key=KEY_CHARS, around=AROUND, data=st.data())
def test_no_piece_of_a_cut_off_key_survives(key, around, data):
    cut = data.draw(st.integers(6, len(key) - 1))
    assert not leaked(redact(around + key[:cut], [key]), key)    # cut by a length limit
    assert not leaked(redact(key[-cut:] + around, [key]), key)   # a message that starts inside it


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.characters(codec=None, exclude_categories=())), secrets=st.lists(
    st.none() | st.text(st.characters(min_codepoint=0, max_codepoint=0xE000), max_size=40), max_size=9))
def test_redact_never_fails_and_always_masks_the_secret_itself(text, secrets):
    """Any text, any values (a key read from a non-UTF-8 environment holds surrogates)."""
    out = redact(text, secrets)
    for s in secrets:
        if s and len(s) >= 4:
            assert s not in out
