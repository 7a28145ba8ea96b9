import re
from decimal import Decimal

import pytest

from imagebroker.errors import RequestError
from imagebroker.types import Adapter, Cost, ImageRequest


def test_size_is_parsed_into_width_and_height():
    r = ImageRequest(prompt="x", size="1536x1024")
    assert (r.width, r.height, r.size) == (1536, 1024, "1536x1024")


@pytest.mark.parametrize("size", ["1000x7", "big", "5000x5000", "1024*1024"])
def test_bad_size_names_the_rule(size):
    expected = f'size "{size}" is not WIDTHxHEIGHT with both sides 64..4096'
    with pytest.raises(RequestError, match=re.escape(expected)):
        ImageRequest(prompt="x", size=size)


def test_an_aspect_ratio_stays_as_asked_and_a_disagreeing_size_is_refused():
    r = ImageRequest(prompt="x", aspect_ratio="16:9", resolution="1K")
    assert (r.aspect_ratio, r.resolution, r.width) == ("16:9", 1024, None)   # resolved per offering, later
    assert ImageRequest(prompt="x", aspect_ratio="16:9", size="1024x576").width == 1024   # they agree
    with pytest.raises(RequestError, match='aspect_ratio "16:9" and size 1024x1024 disagree'):
        ImageRequest(prompt="x", aspect_ratio="16:9", size="1024x1024")
    with pytest.raises(RequestError, match="aspect_ratio"):
        ImageRequest(prompt="x", aspect_ratio="wide")
    with pytest.raises(RequestError, match='resolution "8K" is not 512, 1K, 2K, 4K'):
        ImageRequest(prompt="x", aspect_ratio="1:1", resolution="8K")
    with pytest.raises(RequestError, match="resolution goes with aspect_ratio"):
        ImageRequest(prompt="x", resolution="1K")


@pytest.mark.parametrize("fields, message", [
    ({"n": 11}, "n: Input should be less than or equal to 10"),
    ({"n": 0}, "n: "),
    ({"prompt": ""}, "prompt: "),
    ({"width": 512}, "width and height go together"),
    ({"background": "transparent", "output_format": "jpeg"}, "transparent needs output_format png"),
    ({"tags": {"bad key": "x"}}, "tag key 'bad key'"),
    ({"unknown_field": 1}, "unknown_field: Extra inputs are not permitted"),
])
def test_invalid_requests_raise_request_error_with_the_field(fields, message):
    with pytest.raises(RequestError, match=message):
        ImageRequest(**{"prompt": "x", **fields})


def test_request_is_frozen():
    r = ImageRequest(prompt="x")
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error
        r.n = 2  # type: ignore[misc]


def test_cost_never_hides_a_missing_price():
    assert str(Cost.unpriced("per_image", "no price")) == "unpriced"
    with pytest.raises(ValueError):
        Cost(usd=Decimal(0), status="unpriced", unit="per_image")
    with pytest.raises(ValueError):
        Cost(usd=None, status="priced", unit="per_image")


def test_adapter_parse_takes_a_trailing_scale():
    assert Adapter.parse("styles/ink.safetensors:0.7") == Adapter(ref="styles/ink.safetensors", scale=0.7)
    assert Adapter.parse("org/repo") == Adapter(ref="org/repo", scale=1.0)
    assert Adapter.parse("C:/x") == Adapter(ref="C:/x", scale=1.0)


@pytest.mark.parametrize("fields, why", [
    ({"prompt": "a\x00b"}, "prompt: contains a NUL character"),
    ({"tags": {"team": "a\x00"}}, "tags: contains a NUL character"),
    ({"tags": {"team": "x" * 257}}, "value of 257 characters, at most 256"),
    ({"idempotency_key": "k" * 201}, "idempotency_key"),
    ({"model": "m" * 201}, "model"),
])
def test_what_the_ledger_would_refuse_is_refused_before_anything_is_paid(fields, why):
    with pytest.raises(RequestError, match=re.escape(why)):
        ImageRequest(**{"prompt": "x", **fields})
    assert ImageRequest(prompt="x", tags={"team": "x" * 256}, idempotency_key="k" * 200)  # the limits themselves
