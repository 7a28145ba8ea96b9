"""Edits as a request: input images checked before anything is paid, planned only onto offerings that can
honour them (a property test), priced with their inputs, kept through fallback, recorded without their
bytes, and driven from the CLI with the same options and JSON as `generate`."""

from __future__ import annotations

import functools
import io
import json
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from imagebroker import Broker
from imagebroker.cli import app
from imagebroker.errors import RequestError
from imagebroker.inputs import alpha_mask, read_input, white_mask
from imagebroker.policies.planner import PlannerState, plan, request_key
from imagebroker.policies.pricing import bound, estimate
from imagebroker.policies.schema import Policy
from imagebroker.providers.catalog import Catalog, builtin_catalog
from imagebroker.testing.fakes import fakes
from imagebroker.types import ImageRequest
from tests.conftest import builtin_providers

CATALOG = builtin_catalog()
TODAY = __import__("datetime").date(2026, 12, 2)


@functools.lru_cache(maxsize=32)
def png(w: int, h: int, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), 128 if mode == "L" else (200, 40, 40) if mode == "RGB" else (200, 40, 40, 255)).save(
        buf, format=fmt)
    return buf.getvalue()


# -- the request ------------------------------------------------------------------------------------
def test_input_images_come_as_bytes_paths_or_pil_images(tmp_path):
    path = tmp_path / "init.png"
    path.write_bytes(png(96, 64))
    pil = Image.new("RGB", (64, 64), (0, 0, 255))
    r = ImageRequest(prompt="x", images=[path, png(80, 80, fmt="JPEG"), pil], mask=png(96, 64, "L"), strength=0.5)
    assert [(i.format, i.size) for i in r.images] == [("png", "96x64"), ("jpeg", "80x80"), ("png", "64x64")]
    assert r.images[0].data == path.read_bytes()   # the caller's bytes, exactly: they are what is sent
    assert r.is_edit and r.init_image is r.images[0] and r.edit_strength == 0.5
    assert ImageRequest(prompt="x", images=str(path)).images[0].sha256 == r.images[0].sha256   # one image alone
    assert "data" not in repr(r.images[0]) and len(repr(r)) < 2000


@pytest.mark.parametrize("fields, message", [
    ({"images": [b"not an image"]}, "images[0]: not a readable image"),
    ({"images": [png(64, 64, fmt="GIF")]}, "images[0]: a GIF image; give PNG, JPEG or WebP"),
    ({"images": [png(8, 8)]}, "images[0]: 8x8 is below 16 px a side"),
    ({"images": [png(64, 64)] * 17}, "17 input images, at most 16"),
    ({"images": [png(64, 64)], "mask": png(32, 32, "L")}, "mask is 32x32, the init image 64x64"),
    ({"mask": png(64, 64, "L")}, "mask needs an image"),
    ({"strength": 0.5}, "strength applies to an edit"),
    ({"images": [png(64, 64)], "strength": 1.5}, "strength"),
    ({"images": ["/nowhere/init.png"]}, "images[0] /nowhere/init.png: cannot read it"),
])
def test_bad_inputs_are_refused_before_anything_is_paid(fields, message):
    with pytest.raises(RequestError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ImageRequest(prompt="x", **fields)


def changed(mask) -> float:
    """The share of the image a mask says to change, as every provider is sent it (white = change)."""
    hist = Image.open(io.BytesIO(white_mask(mask))).histogram()
    return sum(hist[128:]) / sum(hist)


def test_an_init_image_of_another_size_is_fitted_keeping_its_aspect_ratio():
    from imagebroker.providers.offering import request_size

    photo = ImageRequest(prompt="x", images=[png(4032, 3024)])
    assert request_size(photo, CATALOG.resolve("local/sdxl")) == (2048, 1536)          # within its size rule
    assert request_size(photo, CATALOG.resolve("openai/gpt-image-1.5")) == (1536, 1024)   # the nearest offered
    assert request_size(ImageRequest(prompt="x", images=[png(1000, 750)]),
                        CATALOG.resolve("local/tiny-shapes")) == (256, 192)


def test_an_input_given_as_a_dict_is_read_from_its_bytes_never_from_its_claims():
    image = read_input({"data": png(96, 64), "format": "png", "width": 99999, "height": 5})
    assert (image.width, image.height) == (96, 64)
    with pytest.raises(ValueError, match="without its bytes"):
        read_input({"format": "png", "width": 10, "height": 10})


def test_one_mask_convention_converted_per_provider():
    init = read_input(png(64, 32))
    white_left = Image.new("L", (64, 32), 0)
    white_left.paste(255, (0, 0, 32, 32))
    buf = io.BytesIO()
    white_left.save(buf, format="PNG")
    mask = read_input(buf.getvalue())
    openai = Image.open(io.BytesIO(alpha_mask(mask)))   # transparent = change
    assert openai.mode == "RGBA" and openai.getpixel((5, 5))[3] == 0 and openai.getpixel((60, 5))[3] == 255
    flux = Image.open(io.BytesIO(white_mask(mask)))     # white = change
    assert flux.mode == "L" and flux.getpixel((5, 5)) == 255 and flux.getpixel((60, 5)) == 0
    assert changed(mask) == 0.5
    # a mask drawn as OpenAI wants it (transparent where to change) means the same to every provider
    as_openai = read_input(alpha_mask(mask))
    assert Image.open(io.BytesIO(white_mask(as_openai))).getpixel((5, 5)) == 255 and changed(as_openai) == 0.5
    assert init.size == "64x32"


# -- planning: the property -------------------------------------------------------------------------
SIZES = [(64, 64), (512, 512), (1024, 1024), (1200, 800), (832, 1216)]
edits = st.builds(
    lambda count, size, masked, strength, asked, n: ImageRequest(
        prompt="make it blue", images=[png(*size)] * count, mask=png(*size, "L") if masked else None,
        strength=strength, n=n, **({"size": asked} if asked else {})),
    st.integers(1, 17).filter(lambda c: c <= 16), st.sampled_from(SIZES), st.booleans(),
    st.one_of(st.none(), st.floats(0.05, 1.0)), st.sampled_from([None, "1024x1024", "64x64"]), st.integers(1, 3))
catalogs = st.lists(st.sampled_from(sorted(CATALOG.offerings)), min_size=1, max_size=40, unique=True).map(
    lambda ids: Catalog([CATALOG.offerings[i] for i in ids], "t"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=edits, catalog=catalogs)
def test_property_no_planned_candidate_lacks_a_capability_the_edit_needs(request, catalog):
    p = plan(request, Policy(name="p"), catalog, PlannerState(today=TODAY))
    for cand in p.candidates:
        caps = catalog.offerings[cand.offering].capabilities
        assert caps.edit is not None
        assert len(request.images) <= caps.edit.max_images
        assert request.mask is None or caps.edit.mask
        assert request.mask is not None or not caps.edit.mask_required
        assert (request.strength is None or caps.edit.strength) or "strength" in cand.dropped
        if request.width and caps.edit.output_size == "any":
            assert "size" in cand.dropped
    for rejection in p.rejected:
        assert rejection.reasons and all(rejection.reasons)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(catalog=catalogs)
def test_property_text_to_image_never_plans_an_edit_only_endpoint(catalog):
    p = plan(ImageRequest(prompt="a cat"), Policy(name="p"), catalog, PlannerState(today=TODAY))
    assert all(catalog.offerings[c.offering].capabilities.text_to_image for c in p.candidates)
    edit_only = {o.id for o in catalog if not o.capabilities.text_to_image and not o.retired(TODAY)}
    reasons = {r.offering: r.reasons for r in p.rejected}
    assert all("edit only: needs an input image" in reasons[oid] for oid in edit_only)


def test_the_plan_key_reads_input_sizes_not_their_pixels():
    a = ImageRequest(prompt="x", images=[png(512, 512)], mask=png(512, 512, "L"))
    b = ImageRequest(prompt="x", images=[png(512, 512, "RGBA")], mask=png(512, 512, "L"))   # other bytes
    c = ImageRequest(prompt="x", images=[png(1024, 1024)], mask=png(1024, 1024, "L"))
    assert request_key(a) == request_key(b) != request_key(c)
    assert request_key(a) != request_key(ImageRequest(prompt="x", images=[png(512, 512)]))
    assert request_key(a) != request_key(ImageRequest(prompt="x", images=[png(512, 512)], strength=0.3))


def test_rejections_say_what_the_edit_needs():
    r = ImageRequest(prompt="x", images=[png(1024, 1024)] * 5, mask=png(1024, 1024, "L"))
    reasons = {rj.offering: rj.reasons for rj in plan(r, Policy(name="p"), CATALOG, PlannerState(today=TODAY)).rejected}
    assert "no image editing (takes no input images)" in reasons["fal/fal-ai/flux/schnell"]
    assert "takes at most 1 input image, 5 given" in reasons["local/tiny-shapes"]
    assert "no mask support" in reasons["google/gemini-3-pro-image"]
    unmasked = ImageRequest(prompt="x", images=[png(1024, 1024)])
    reasons = {rj.offering: rj.reasons for rj in plan(unmasked, Policy(name="p"), CATALOG,
                                                     PlannerState(today=TODAY)).rejected}
    assert "needs a mask (an inpainting endpoint)" in reasons["bfl/flux-pro-1.0-fill"]
    few_steps = ImageRequest(prompt="x", images=[png(64, 64)], strength=0.05, steps=10, model="local/tiny-shapes")
    why = plan(few_steps, Policy(name="p"), CATALOG, PlannerState(today=TODAY)).rejected[0].reasons
    assert "strength 0.05 x 10 steps leaves no denoising step" in why


def test_strength_on_an_offering_without_it_is_reported_as_dropped():
    r = ImageRequest(prompt="x", images=[png(1024, 1024)], strength=0.4, model="google/gemini-3-pro-image")
    cand = plan(r, Policy(name="p"), CATALOG, PlannerState(today=TODAY)).candidates[0]
    assert cand.dropped == ("strength",)


def test_a_policy_rule_can_route_edits_apart():
    policy = Policy.model_validate({"name": "p", "rules": [{"name": "inpainting", "when": {"mask": True},
                                                            "set": {"prefer": ["bfl/flux-pro-1.0-fill"],
                                                                    "objective": "ordered"}}]})
    masked = ImageRequest(prompt="x", images=[png(1024, 1024)], mask=png(1024, 1024, "L"))
    p = plan(masked, policy, CATALOG, PlannerState(today=TODAY))
    assert p.rule == "inpainting" and p.candidates[0].offering == "bfl/flux-pro-1.0-fill"
    assert plan(ImageRequest(prompt="x"), policy, CATALOG, PlannerState(today=TODAY)).rule is None


# -- pricing ------------------------------------------------------------------------------------------
def test_estimates_and_bounds_count_the_input_images():
    gpt = CATALOG.resolve("openai/gpt-image-2")
    t2i, two = ImageRequest(prompt="x", quality="low"), ImageRequest(prompt="x", quality="low",
                                                                     images=[png(1024, 1024)] * 2)
    diff = estimate(two, gpt).usd - estimate(t2i, gpt).usd
    assert diff == 2 * 1024 * Decimal("0.000008")          # input_image_tokens x the image-input rate
    assert bound(two, gpt) - bound(t2i, gpt) == 2 * 1536 * Decimal("0.000008")   # the patch budget
    flux2 = CATALOG.resolve("bfl/flux-2-pro")
    one_mp = ImageRequest(prompt="x", size="1000x1000", images=[png(1000, 1000)])
    assert estimate(one_mp, flux2).usd == Decimal("0.045") == bound(one_mp, flux2)   # BFL's 1 MP edit example
    local = CATALOG.resolve("local/tiny-shapes")
    full = estimate(ImageRequest(prompt="x"), local, device="cuda")
    half = estimate(ImageRequest(prompt="x", images=[png(64, 64)], strength=0.5), local, device="cuda")
    assert half.units["gpu_seconds"] == pytest.approx(full.units["gpu_seconds"] * 0.5)


# -- through the broker: fallback, ledger, idempotency ----------------------------------------------------
def two_fakes_policy(openai, bfl) -> Policy:
    return Policy.model_validate({
        "name": "fallback", "deny": builtin_providers("openai", "bfl"), "objective": "ordered",
        "prefer": ["openai/gpt-image-2", "bfl/flux-2-pro"],
        "providers": {"openai": {"base_url": openai.base_url}, "bfl": {"base_url": bfl.base_url,
                                                                        "poll_interval_s": 0.02}},
        "retry": {"max_attempts": 1}})


def test_fallback_keeps_every_input_image(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", fakes()["openai"].key)
    monkeypatch.setenv("BFL_API_KEY", fakes()["bfl"].key)
    init, ref = png(1024, 1024), png(512, 512)
    with fakes()["openai"](["500"]) as openai, fakes()["bfl"](["ok"]) as bfl, \
            Broker(two_fakes_policy(openai, bfl), ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        result = b.generate("make it blue", images=[init, ref], model=None)
    assert [a.offering for a in result.attempts] == ["openai/gpt-image-2", "bfl/flux-2-pro"]
    assert result.offering == "bfl/flux-2-pro"
    sent = bfl.state["edits"][0]["inputs"]
    assert [sent["input_image"].sha256, sent["input_image_2"].sha256] == [read_input(init).sha256,
                                                                          read_input(ref).sha256]
    assert [r["path"] for r in openai.requests] == ["/v1/images/edits"]   # the first offering had them too


def test_an_answer_whose_images_are_refused_keeps_what_it_billed(tmp_path, monkeypatch):
    monkeypatch.setenv("TOGETHER_API_KEY", fakes()["together"].key)
    with fakes()["together"](["tiny"]) as fake:
        policy = Policy.model_validate({"name": "t", "deny": builtin_providers("together"),
                                        "providers": {"together": {"base_url": fake.base_url}},
                                        "retry": {"max_attempts": 1}, "fallback": {"max_offerings": 1}})
        with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}") as b, pytest.raises(Exception) as exc:
            b.generate("x", model="together/black-forest-labs/FLUX.1-schnell")
    (attempt,) = exc.value.attempts
    assert attempt.error_type == "BadProviderResponse"
    assert attempt.cost.status == "priced" and attempt.cost.usd > 0 and "answer refused, billed" in attempt.cost.detail


def test_an_edit_is_recorded_by_its_inputs_hashes_never_their_bytes(tmp_path, monkeypatch):
    import sqlite3

    init = png(64, 64)
    policy = Policy.model_validate({"name": "l", "deny": builtin_providers("local")})
    with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        b.generate("a red circle on a green background", images=[init], strength=0.6, seed=3)
    row = sqlite3.connect(tmp_path / "l.db").execute("select request_json from calls").fetchone()
    saved = json.loads(row[0])
    assert saved["edit"]["images"][0]["sha256"] == read_input(init).sha256 and saved["edit"]["strength"] == 0.6
    assert len(row[0]) < 1000   # sizes and hashes, not bytes


def test_an_idempotency_key_reused_with_other_images_is_refused(tmp_path):
    policy = Policy.model_validate({"name": "l", "deny": builtin_providers("local")})
    ledger = f"sqlite:///{tmp_path / 'l.db'}"
    with Broker(policy, ledger=ledger, store=True) as b:
        first = b.generate("a red circle on a blue background", images=[png(64, 64)], seed=1, idempotency_key="k")
    with Broker(policy, ledger=ledger, store=True) as b:   # another process: the ledger remembers the key
        again = b.generate("a red circle on a blue background", images=[png(64, 64)], seed=1, idempotency_key="k")
        assert again.request_id == first.request_id
        with pytest.raises(RequestError, match="idempotency"):
            b.generate("a red circle on a blue background", images=[png(64, 64, "RGBA")], seed=1,
                       idempotency_key="k")


def test_whatif_replays_edits_by_their_input_sizes(tmp_path):
    from imagebroker.broker.ledger.store import Ledger
    from imagebroker.broker.whatif import whatif

    policy = Policy.model_validate({"name": "l", "deny": builtin_providers("local")})
    ledger = f"sqlite:///{tmp_path / 'l.db'}"
    with Broker(policy, ledger=ledger) as b:
        b.generate("a red circle on a green background", images=[png(64, 64)], mask=png(64, 64, "L"), seed=3)
    # replayed as an inpainting request of the same size: under a policy whose offerings take no mask it is
    # unroutable, and says why
    report = whatif(Ledger(ledger), policy, CATALOG)
    assert report.partial == 0 and report.routed == 1 and report.local_calls == 1
    no_masks = Policy.model_validate({"name": "g", "deny": builtin_providers("google")})
    with_google = whatif(Ledger(ledger), no_masks, CATALOG)
    assert with_google.unroutable == 1
    assert any("no mask support" in reason for reason in with_google.reasons)


# -- the CLI --------------------------------------------------------------------------------------------
runner = CliRunner()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_cli_edit_writes_the_images_and_prints_the_generate_json(tmp_path):
    init = write(tmp_path / "init.png", png(64, 64))
    mask = write(tmp_path / "mask.png", png(64, 64, "L"))
    out = tmp_path / "out"
    res = runner.invoke(app, ["edit", "a red circle on a green background", "--image", str(init), "--mask", str(mask),
                              "--seed", "4", "-n", "2", "--out", str(out), "--json", "--policy", "local-first"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert set(data) == {"request_id", "offering", "images", "cost", "latency_s", "attempts", "applied", "dropped",
                         "warnings"}
    assert data["offering"] == "local/tiny-shapes" and data["applied"]["task"] == "inpaint"
    assert [i["seed"] for i in data["images"]] == [4, 5] and all(Path(i["path"]).is_file() for i in data["images"])
    sidecar = json.loads(Path(data["images"][0]["sidecar"]).read_text())
    assert sidecar["inputs"]["mask"]["sha256"] == read_input(mask).sha256


@pytest.mark.parametrize("args, message", [
    (["--image", "missing.png"], "--image missing.png: file not found"),
    ([], "edit needs --image"),
    (["--image", "bad.png"], "--image bad.png: not a readable image"),
    (["--image", "init.png", "--mask", "small.png"], "mask is 32x32, the init image 64x64"),
])
def test_cli_edit_mistakes_exit_2_with_one_line(tmp_path, args, message):
    write(tmp_path / "init.png", png(64, 64))
    write(tmp_path / "small.png", png(32, 32, "L"))
    write(tmp_path / "bad.png", b"GIF89a not really")
    res = runner.invoke(app, ["edit", "x", *args])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output


def test_cli_route_explains_an_edit_plan(tmp_path):
    write(tmp_path / "init.png", png(64, 64))
    res = runner.invoke(app, ["route", "x", "--image", "init.png", "--strength", "0.5", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["candidates"][0]["offering"] == "local/tiny-shapes"
    reasons = {r["offering"]: r["reasons"] for r in data["rejected"]}
    assert any("no image editing" in x for x in reasons["fal/fal-ai/flux/schnell"])
