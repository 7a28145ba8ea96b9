"""Pricing vectors, each worked by hand from the published formula (see the comment on each)."""

from decimal import Decimal as D

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imagebroker.policies.pricing import bound, estimate, settle
from imagebroker.providers.catalog import builtin_catalog
from imagebroker.providers.offering import Offering
from imagebroker.types import ImageRequest


def offering(oid: str, **price_update) -> Offering:
    o = builtin_catalog().resolve(oid)
    assert o is not None, oid
    if price_update:
        o = o.model_copy(update={"price": o.price.model_copy(update=price_update)})
    return o


def req(**kw) -> ImageRequest:
    return ImageRequest(prompt=kw.pop("prompt", "a cat"), **kw)


# per_image, with size x quality tables
@pytest.mark.parametrize("oid, kw, usage, expected", [
    # gpt-image-1-mini 1024x1024 low: $0.005 x 2 images
    ("openai/gpt-image-1-mini", {"size": "1024x1024", "quality": "low", "n": 2}, {"images": 2}, "0.010"),
    # 1536x1024 high: $0.052 from the table
    ("openai/gpt-image-1-mini", {"size": "1536x1024", "quality": "high"}, {"images": 1}, "0.052"),
    # 1024x1024 with no quality: priced as medium, the base $0.011
    ("openai/gpt-image-1-mini", {"size": "1024x1024"}, {"images": 1}, "0.011"),
    # Replicate flux-schnell: $0.003 x 4 outputs
    ("replicate/black-forest-labs/flux-schnell", {"n": 4}, {"images": 4}, "0.012"),
])
def test_per_image(oid, kw, usage, expected):
    cost = settle(usage, offering(oid), req(**kw))
    assert (cost.usd, cost.status, cost.unit) == (D(expected), "priced", "per_image")


# per_megapixel: fal rounds each image UP to whole MP; BFL FLUX.2 first MP + additional MP
@pytest.mark.parametrize("oid, size, n, expected", [
    ("fal/fal-ai/flux/dev", "1024x1536", 1, "0.05"),        # 1.57 MP -> 2 MP x $0.025
    ("fal/fal-ai/flux/dev", "1024x1024", 2, "0.10"),        # 1.05 MP -> 2 MP x $0.025, x 2 images
    ("fal/fal-ai/flux/schnell", "512x512", 3, "0.009"),     # 0.26 MP -> 1 MP x $0.003, x 3
    ("bfl/flux-2-pro", "1024x1024", 1, "0.030728640"),      # $0.03 + 0.048576 MP x $0.015
    ("bfl/flux-2-pro", "1920x1080", 1, "0.046104"),         # $0.03 + 1.0736 MP x $0.015
    ("bfl/flux-2-klein-4b", "512x512", 1, "0.014"),         # under 1 MP: the first-MP price
    ("together/black-forest-labs/FLUX.1-schnell", "1024x768", 1, "0.0021233664"),  # 0.786432 MP x $0.0027
])
def test_per_megapixel(oid, size, n, expected):
    w, h = size.split("x")
    cost = settle({"images": n, "width": int(w), "height": int(h)}, offering(oid), req(size=size, n=n))
    assert cost.usd == D(expected).quantize(D("1e-9")).normalize()
    assert cost.status == "priced"


# per_token: settled from usage; estimated from size x quality before the call
def test_per_token_settles_from_usage():
    # gpt-image-2: 50 text-in x $5/M + 1756 image-out x $30/M = 0.00025 + 0.05268
    usage = {"input_text_tokens": 50, "output_image_tokens": 1756}
    cost = settle(usage, offering("openai/gpt-image-2"), req(size="1024x1024"))
    assert (cost.usd, cost.status) == (D("0.05293"), "priced")


def test_per_token_counts_image_input_and_cached_input():
    # 2.6-sunburst: 100 text x 5e-6 + 1000 image-in x 8e-6 + 400 cached image-in x 2e-6 + 439 out x 3e-5
    usage = {"input_text_tokens": 100, "input_image_tokens": 1000, "cached_input_image_tokens": 400,
             "output_image_tokens": 439}
    cost = settle(usage, offering("openai/gpt-image-2.6-sunburst"), req())
    assert cost.usd == D("0.0005") + D("0.008") + D("0.0008") + D("0.01317")


def test_per_token_estimate_scales_tokens_by_pixels_and_quality():
    # 2.5-flare high at 1024x1536: 1756 x 1.5 = 2634 tokens x $30/M = 0.07902, + 2 prompt tokens x $5/M
    request = req(prompt="a cat", size="1024x1536", quality="high")
    cost = estimate(request, offering("openai/gpt-image-2.5-flare"))
    assert (cost.usd, cost.status) == (D("0.07903"), "estimated")


def test_per_token_without_usage_is_estimated_not_priced():
    cost = settle({"images": 1}, offering("openai/gpt-image-2"), req(size="1024x1024", quality="low"))
    assert cost.status == "estimated" and "no token usage" in cost.detail


def test_data_residency_uplift_adds_ten_percent():
    o = offering("openai/gpt-image-2", uplift=D("0.10"))
    cost = settle({"output_image_tokens": 1000}, o, req())
    assert cost.usd == D("0.033")  # 1000 x $30/M x 1.10


# per_second: Replicate predict_time x hardware rate
@pytest.mark.parametrize("seconds, expected", [
    (4.1, "0.0039975"),     # 4.1 s x $0.000975/s (gpu-l40s)
    (10, "0.00975"),
    (0.5, "0.0004875"),
])
def test_per_second(seconds, expected):
    cost = settle({"predict_time_s": seconds}, offering("replicate/stability-ai/sdxl"), req())
    assert (cost.usd, cost.status) == (D(expected), "priced")


def test_per_second_without_predict_time_is_estimated():
    cost = settle({}, offering("replicate/stability-ai/sdxl"), req(n=2))
    assert cost.status == "estimated" and cost.usd == D("0.007995")  # 2 x 4.1 s x $0.000975


# per_credit: credits x $0.01
@pytest.mark.parametrize("oid, usage, n, expected", [
    ("stability/stable-image-ultra", {"images": 1}, 1, "0.08"),       # 8 credits
    ("stability/sd3.5-large", {"images": 1}, 1, "0.065"),             # 6.5 credits
    ("bfl/flux-kontext-max", {"images": 1, "credits": 8}, 1, "0.08"),  # reported credits win
    ("bfl/flux-pro-1.1", {"images": 2}, 2, "0.08"),                    # 2 x 4 credits
])
def test_per_credit(oid, usage, n, expected):
    cost = settle(usage, offering(oid), req(n=n))
    assert (cost.usd, cost.status) == (D(expected), "priced")


# gpu_seconds: measured busy seconds x $/GPU-hour (CPU at the CPU rate)
@pytest.mark.parametrize("seconds, rate, device, expected", [
    (7.2, "2.50", "cuda", "0.005"),          # 7.2 s x $2.50 / 3600
    (3600, "2.69", "cuda", "2.69"),
    (1.8, "0.34", "cuda", "0.00017"),
    (12, "0", "cpu", "0"),                   # CPU at the default $0/h: priced, and says so
])
def test_gpu_seconds(seconds, rate, device, expected):
    o = offering("local/sdxl", usd_per_gpu_hour=D(rate), cpu_usd_per_hour=D(rate))
    cost = settle({"gpu_seconds": seconds, "device": device}, o, req())
    assert (cost.usd, cost.status) == (D(expected), "priced")
    assert device in cost.detail


def test_gpu_seconds_without_a_rate_is_unpriced_and_says_what_to_set():
    cost = settle({"gpu_seconds": 3.0, "device": "cuda"}, offering("local/sdxl"), req())
    assert cost.usd is None and cost.status == "unpriced"
    assert "local.gpu_usd_per_hour" in cost.detail


def test_gpu_seconds_with_measured_energy_adds_the_energy_cost():
    # 7.2 s x $2.50/h = $0.005; 2520 J = 0.0007 kWh x $0.12/kWh = $0.000084
    o = offering("local/sdxl", usd_per_gpu_hour=D("2.50"), energy_usd_per_kwh=D("0.12"))
    cost = settle({"gpu_seconds": 7.2, "device": "cuda", "energy_j": 2520}, o, req())
    assert cost.usd == D("0.005084") and "kWh" in cost.detail


# -- the bound: what budgets reserve -----------------------------------------------------------
@pytest.mark.parametrize("oid, kw, expected", [
    # gpt-image-1-mini 1024x1024, quality auto: it may pick high, $0.036 (the dearest row for the size)
    ("openai/gpt-image-1-mini", {"size": "1024x1024", "quality": "auto", "n": 2}, "0.072"),
    # an asked quality is the price itself: low $0.005
    ("openai/gpt-image-1-mini", {"size": "1024x1024", "quality": "low"}, "0.005"),
    # gpt-image-2 with no quality: 7024 high-quality image tokens x $30/M + "a cat" = 5 bytes x $5/M
    ("openai/gpt-image-2", {"size": "1024x1024"}, "0.210745"),
    # fal flux/dev 1024x768: exact, 1 MP rounded up x $0.025, x 3 images
    ("fal/fal-ai/flux/dev", {"size": "1024x768", "n": 3}, "0.075"),
])
def test_the_bound_is_the_most_a_call_can_cost(oid, kw, expected):
    assert bound(req(**kw), offering(oid)) == D(expected)


def test_a_per_second_bound_uses_the_declared_maximum_or_the_latency_p95():
    o = offering("replicate/stability-ai/sdxl")  # billed by predict_time: p95 40 s, typical 4.1 s
    declared = o.model_copy(update={"price": o.price.model_copy(update={"max_seconds": 20.0})})
    assert bound(req(n=2), declared) == D(str(40.0)) * o.price.usd_per_second
    assert bound(req(), o) == D(str(max(o.latency.p95_s, o.price.typical_seconds))) * o.price.usd_per_second


@settings(max_examples=200, deadline=None)
@given(oid=st.sampled_from(sorted(o.id for o in builtin_catalog() if o.price is not None)),
       quality=st.sampled_from([None, "auto", "low", "medium", "high"]), n=st.integers(1, 4),
       prompt=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1,
                      max_size=200))
def test_the_bound_is_never_below_the_estimate(oid, quality, n, prompt):
    o = offering(oid)
    if quality and o.capabilities.qualities and quality not in o.capabilities.qualities:
        quality = None
    r = ImageRequest(prompt=prompt, quality=quality, n=min(n, o.capabilities.max_n))
    expected, worst = estimate(r, o), bound(r, o)
    assert expected.usd is None or worst >= expected.usd
