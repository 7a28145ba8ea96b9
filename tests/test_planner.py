from datetime import date
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagebroker.policies.effective import effective_catalog
from imagebroker.policies.loader import load_policy
from imagebroker.policies.planner import PlannerState, plan
from imagebroker.policies.schema import Policy
from imagebroker.providers.catalog import Catalog, builtin_catalog
from imagebroker.types import Adapter, ImageRequest

TODAY = date(2026, 11, 22)
ALL_AVAILABLE = PlannerState(today=TODAY)


def planned(policy: Policy, request: ImageRequest, state: PlannerState = ALL_AVAILABLE):
    catalog = effective_catalog(policy, builtin_catalog())
    return plan(request, policy, catalog, state), catalog


def test_eu_only_never_lists_an_offering_outside_the_eu():
    p, cat = planned(load_policy("eu-only"), ImageRequest(prompt="x", size="1024x1024"))
    assert p.candidates
    for c in p.candidates:
        assert set(cat.offerings[c.offering].regions) <= {"eu", "on_prem"}
    rejected = {r.offering: r.reasons for r in p.rejected}
    assert any("processes data in us, policy allows eu, on_prem" in r
               for r in rejected["replicate/black-forest-labs/flux-dev"])


def test_commercial_safe_never_lists_a_non_commercial_license():
    p, cat = planned(load_policy("commercial-safe"), ImageRequest(prompt="x", size="1024x1024"))
    assert all(cat.offerings[c.offering].license.commercial_use == "yes" for c in p.candidates)
    reasons = {r.offering: r.reasons for r in p.rejected}
    assert "license FLUX.1 [dev] Non-Commercial License: commercial use no" in reasons["local/flux-dev"]


def test_cost_ceiling_reason_shows_estimate_and_limit():
    policy = Policy(name="t", constraints={"max_cost_per_image_usd": "0.05"})
    p, _ = planned(policy, ImageRequest(prompt="x", size="1024x1024", quality="max"))
    reasons = {r.offering: r.reasons for r in p.rejected}
    assert "est $0.2107/image > max $0.05" in reasons["openai/gpt-image-2.6-sunburst"]
    assert all(c.estimated_cost.usd <= Decimal("0.05") for c in p.candidates)


def test_missing_key_names_the_variable():
    state = PlannerState(today=TODAY, unavailable={"replicate": "no API key: set REPLICATE_API_TOKEN"})
    p, _ = planned(Policy(name="t"), ImageRequest(prompt="x"), state)
    reasons = {r.offering: r.reasons for r in p.rejected}
    assert "no API key: set REPLICATE_API_TOKEN" in reasons["replicate/black-forest-labs/flux-dev"]


def test_lora_requests_only_go_to_offerings_with_adapters():
    req = ImageRequest(prompt="x", size="1024x1024", adapters=(Adapter(ref="me/style"),))
    p, cat = planned(Policy(name="t"), req)
    assert p.candidates and all(cat.offerings[c.offering].capabilities.adapters for c in p.candidates)
    assert "no LoRA/adapter support" in {r.offering: r.reasons for r in p.rejected}["bfl/flux-2-pro"]


def test_soft_fields_are_reported_as_dropped_not_silently_ignored():
    req = ImageRequest(prompt="x", size="1024x1024", negative_prompt="blurry", steps=30, seed=1)
    p, _ = planned(Policy(name="t", prefer=("bfl/flux-2-pro",), objective="ordered"), req)
    first = p.candidates[0]
    assert first.offering == "bfl/flux-2-pro" and set(first.dropped) == {"negative_prompt", "steps"}


def test_a_scheduler_of_the_wrong_family_is_rejected_before_running():
    req = ImageRequest(prompt="x", size="1024x1024", scheduler="euler_a", model="local/flux-schnell")
    p, _ = planned(Policy(name="t"), req)
    assert not p.candidates
    assert "does not fit a flux model" in p.rejected[0].reasons[0]


def test_tiny_shapes_is_the_last_resort():
    req = ImageRequest(prompt="a red circle on a blue background")
    everything_missing = {o.id: "no API key" for o in builtin_catalog() if o.id != "local/tiny-shapes"}
    p, _ = planned(load_policy("default"), req, PlannerState(today=TODAY, unavailable=everything_missing))
    assert [c.offering for c in p.candidates] == ["local/tiny-shapes"]
    p, _ = planned(load_policy("default"), req)  # with keys: tiny-shapes waits
    assert "local/tiny-shapes" not in [c.offering for c in p.candidates]
    assert "last resort" in {r.offering: r.reasons for r in p.rejected}["local/tiny-shapes"][0]


def test_objectives_order_candidates():
    req = ImageRequest(prompt="x", size="1024x1024")
    cheap, _ = planned(Policy(name="t", objective="cheapest"), req)
    usd = [c.estimated_cost.usd for c in cheap.candidates if c.estimated_cost.usd is not None]
    assert usd == sorted(usd)
    fast, _ = planned(Policy(name="t", objective="fastest"), req)
    lat = [c.estimated_latency_s for c in fast.candidates]
    assert lat == sorted(lat)
    best, cat = planned(Policy(name="t", objective="best"), req)
    ranks = [cat.offerings[c.offering].rank for c in best.candidates]
    assert ranks == sorted(ranks, reverse=True)


def test_observed_latency_overrides_the_catalog_estimate():
    state = PlannerState(today=TODAY, observed_latency={"bfl/flux-2-pro": (99.0, 120.0)})
    p, _ = planned(Policy(name="t", constraints={"max_latency_s": 60}), ImageRequest(prompt="x"), state)
    assert "est latency 99 s > max 60 s" in {r.offering: r.reasons for r in p.rejected}["bfl/flux-2-pro"]


# -- the property test ------------------------------------------------------------------------
REGIONS = ["us", "eu", "global", "on_prem"]
constraints = st.fixed_dictionaries({}, optional={
    "max_cost_per_image_usd": st.decimals(min_value=0, max_value="0.3", places=3),
    "max_cost_per_call_usd": st.decimals(min_value=0, max_value="1", places=3),
    "max_latency_s": st.floats(min_value=0.5, max_value=60),
    "licenses": st.sampled_from(["commercial", "conditional", "any"]),
    "regions": st.lists(st.sampled_from(REGIONS), min_size=1, unique=True),
    "require_seed": st.booleans(),
    "require_adapters": st.booleans(),
})
policies = st.builds(lambda c, o, deny: Policy(name="p", constraints=c, objective=o, deny=deny),
                     constraints, st.sampled_from(["cheapest", "fastest", "best", "ordered"]),
                     st.lists(st.sampled_from(["fal", "openai/*", "local", "bfl/flux-2-*"]), max_size=2))
requests = st.builds(
    lambda size, n, seed, quality, lora: ImageRequest(
        prompt="p", size=size, n=n, seed=seed, quality=quality,
        adapters=(Adapter(ref="x/y"),) if lora else ()),
    st.sampled_from([None, "1024x1024", "512x512", "1536x1024", "1000x1000", "64x64"]),
    st.integers(1, 6), st.one_of(st.none(), st.integers(0, 10)),
    st.sampled_from([None, "low", "high", "max"]), st.booleans())
_BASE = builtin_catalog()
catalogs = st.lists(st.sampled_from(sorted(_BASE.offerings)), min_size=1, max_size=30, unique=True).map(
    lambda ids: Catalog([_BASE.offerings[i] for i in ids], "t"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies, request=requests, catalog=catalogs)
def test_property_no_candidate_breaks_a_hard_constraint(policy, request, catalog):
    state = PlannerState(today=TODAY)
    p = plan(request, policy, catalog, state)
    c = policy.constraints
    for cand in p.candidates:
        o = catalog.offerings[cand.offering]
        usd = cand.estimated_cost.usd
        if c.max_cost_per_image_usd is not None:
            assert usd is not None and usd / request.n <= c.max_cost_per_image_usd
        if c.max_cost_per_call_usd is not None:
            assert usd is not None and usd <= c.max_cost_per_call_usd
        if c.max_latency_s is not None:
            assert cand.estimated_latency_s <= c.max_latency_s
        if c.regions is not None:
            assert set(o.regions) <= set(c.regions)
        if c.licenses == "commercial":
            assert o.license.commercial_use == "yes"
        if c.licenses == "conditional":
            assert o.license.commercial_use != "no"
        if c.require_seed:
            assert o.capabilities.seed
        if c.require_adapters or request.adapters:
            assert o.capabilities.adapters
        if request.n > o.capabilities.max_n:   # split into calls of at most max_n, and said so
            assert c.split_n and any("calls of at most" in w for w in cand.warnings)
        if request.width:
            assert o.capabilities.size_problem(request.width, request.height) is None
        assert not o.retired(TODAY)
    for r in p.rejected:
        assert r.reasons and all(r.reasons)
    assert plan(request, policy, catalog, state) == p  # deterministic
    planned_ids = {c.offering for c in p.candidates} | {r.offering for r in p.rejected}
    assert planned_ids == set(catalog.offerings)  # every offering accounted for, a retired one as rejected


# -- the plan memo's key ----------------------------------------------------------------------
# The broker memoises plans by `request_key`. Fields the key leaves out (or reads only in part) must
# not change a plan; a new ImageRequest field must be placed on one side or the other.
KEYED = {"width", "height", "n", "steps", "scheduler", "quality", "output_format", "background", "adapters",
         "model", "tags", "max_cost_usd", "max_latency_s", "strength", "aspect_ratio", "resolution",
         "partial_images"}
# length, presence, truthiness; input images by their sizes, the mask by its presence
# control: its kind, scale, window and image size (not its pixels); image prompts: their scales
PARTLY = {"prompt", "negative_prompt", "seed", "guidance_scale", "images", "mask", "control", "image_prompts"}
IGNORED = {"idempotency_key", "extra"}


def test_every_request_field_is_placed_in_or_out_of_the_plan_key():
    assert set(ImageRequest.model_fields) == KEYED | PARTLY | IGNORED


full_requests = st.fixed_dictionaries({"prompt": st.text("ab ", min_size=1, max_size=40)}, optional={
    "negative_prompt": st.sampled_from(["", "blur", "text, watermark"]),
    "size": st.sampled_from(["1024x1024", "512x512", "64x64"]),
    "n": st.integers(1, 4), "seed": st.integers(0, 2**40), "steps": st.integers(1, 60),
    "guidance_scale": st.floats(0, 20), "scheduler": st.sampled_from(["euler", "ddim"]),
    "quality": st.sampled_from(["low", "high"]), "output_format": st.sampled_from(["png", "webp"]),
    "tags": st.dictionaries(st.sampled_from(["team", "env"]), st.sampled_from(["a", "b"]), max_size=2),
    "max_cost_usd": st.decimals(min_value="0.001", max_value="0.2", places=3),
    "idempotency_key": st.text("xyz", min_size=1, max_size=5),
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fields=full_requests, other=st.data())
def test_requests_with_the_same_plan_key_get_the_same_plan(fields, other):
    from imagebroker.policies.planner import request_key

    policy = load_policy("local-first")
    a = ImageRequest(**fields)
    changed = dict(fields, prompt=other.draw(st.text("cd", min_size=len(a.prompt), max_size=len(a.prompt))),
                   idempotency_key="other", extra={"fal": {"x": 1}})
    if "seed" in fields:
        changed["seed"] = other.draw(st.integers(0, 2**40))
    if "guidance_scale" in fields:
        changed["guidance_scale"] = other.draw(st.floats(0, 20))
    if fields.get("negative_prompt"):
        changed["negative_prompt"] = "something else entirely"
    b = ImageRequest(**changed)
    assert request_key(a) == request_key(b)
    assert planned(policy, a)[0] == planned(policy, b)[0]


# -- aspect ratios, resolved per offering --------------------------------------------------------------
shapes = st.builds(lambda ratio, res, n: ImageRequest(prompt="a cat", aspect_ratio=ratio, resolution=res, n=n),
                   st.sampled_from(["1:1", "16:9", "9:16", "3:2", "2:3", "4:3", "21:9", "5:4"]),
                   st.sampled_from([None, "512", "1K", "2K", "4K", 768]), st.integers(1, 2))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=shapes, catalog=catalogs, match=st.sampled_from(["exact", "nearest"]))
def test_property_every_candidate_makes_a_size_it_can_for_the_aspect_ratio_and_is_priced_at_it(
        request, catalog, match):
    import math

    from imagebroker.policies.pricing import estimate
    from imagebroker.types import parse_ratio

    policy = Policy.model_validate({"name": "p", "constraints": {"size_match": match}})
    p = plan(request, policy, catalog, PlannerState(today=TODAY))
    rw, rh = parse_ratio(request.aspect_ratio)
    for cand in p.candidates:
        o = catalog.offerings[cand.offering]
        w, h = (int(v) for v in cand.size.split("x"))
        assert o.capabilities.size_problem(w, h) is None
        if match == "exact":
            assert abs(math.log((w / h) / (rw / rh))) <= 0.01
        units = estimate(request, o).units
        assert (units.get("width"), units.get("height")) in ((w, h), (None, None))
