"""The planner: for one request, which offerings may serve it, in what order, and why the others may not.

A pure function of its inputs (request, policy, catalog, state): no IO, no clock, no randomness, so
`imagebroker route` shows exactly what `generate()` would do.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal

from ..errors import RequestError
from ..providers import schedulers
from ..providers.catalog import Catalog
from ..providers.offering import Capabilities, Offering, request_size
from ..types import Candidate, Cost, ImageRequest, Plan, Rejection, off_ratio, parse_size
from .pricing import CHARS_PER_TOKEN, bound, estimate
from .schema import Constraints, Policy, Rule

DEFAULT_LOAD_S = 15.0


@dataclass(frozen=True)
class PlannerState:
    """What the planner knows of the world beyond the request and the policy."""

    today: date
    unavailable: Mapping[str, str] = field(default_factory=dict)   # offering id or provider -> why
    observed_latency: Mapping[str, tuple[float, float]] = field(default_factory=dict)  # p50, p95
    cold: frozenset[str] = frozenset()          # offerings that must load first (a local pipeline)
    devices: Mapping[str, str] = field(default_factory=dict)   # offering -> device, where it sets the price
    max_marginal_usd: Decimal | None = None     # a `restrict` budget's remaining headroom


@dataclass
class _Effective:
    constraints: Constraints
    objective: str
    prefer: tuple[str, ...]
    deny: tuple[str, ...]
    rule: str | None


def _matches(o: Offering, pattern: str) -> bool:
    return _match(o.id, o.provider, o.aliases, pattern)


def _first_match(catalog: Catalog, patterns: tuple[str, ...]) -> dict[str, int]:
    """offering id -> index of the first pattern it matches, for the whole catalog, memoised on it."""
    found = catalog.pattern_index.get(patterns)
    if found is None:
        found = catalog.pattern_index[patterns] = {
            o.id: i for o in catalog for i in [next((i for i, p in enumerate(patterns) if _matches(o, p)), -1)]
            if i >= 0}
    return found


@functools.lru_cache(maxsize=65_536)
def _match(oid: str, provider: str, aliases: tuple[str, ...], pattern: str) -> bool:
    return pattern == provider or pattern in aliases or fnmatch.fnmatchcase(oid, pattern)


def _rule_applies(rule: Rule, request: ImageRequest) -> bool:
    w = rule.when
    return all([
        all(request.tags.get(k) == v for k, v in w.tags.items()),
        w.size is None or request.size == w.size,
        w.min_n is None or request.n >= w.min_n,
        w.adapters is None or bool(request.adapters) == w.adapters,
        w.model is None or request.model == w.model,
        w.negative_prompt is None or bool(request.negative_prompt) == w.negative_prompt,
        w.edit is None or request.is_edit == w.edit,
        w.mask is None or (request.mask is not None) == w.mask,
        w.control is None or bool(request.control) == w.control,
        w.image_prompts is None or bool(request.image_prompts) == w.image_prompts,
    ])


def effective_settings(request: ImageRequest, policy: Policy) -> _Effective:
    eff = _Effective(policy.constraints, policy.objective, policy.prefer, policy.deny, None)
    for rule in policy.rules:
        if _rule_applies(rule, request):
            s = rule.set
            if s.constraints is not None:
                eff.constraints = eff.constraints.model_copy(
                    update=s.constraints.model_dump(exclude_unset=True))
            eff.objective = s.objective or eff.objective
            eff.prefer = s.prefer if s.prefer is not None else eff.prefer
            eff.deny = s.deny if s.deny is not None else eff.deny
            eff.rule = rule.name
            break
    return eff


def latency_estimate(o: Offering, state: PlannerState, request: ImageRequest | None = None) -> float:
    """The p50 this request can expect: observed (the ledger's last hour) or the catalog's, plus the load
    of a local model not yet loaded. A local model's catalog p50 is for its default size and steps; the
    work grows with the steps and a little faster than the pixels (attention): measured on tiny-shapes,
    64x64 1.0 s, 128x128 3.2 s, 256x256 31 s, so the estimate scales as steps x pixels^1.25."""
    p50 = state.observed_latency.get(o.id, (o.latency.p50_s, o.latency.p95_s))[0]
    if request is not None and o.kind == "local" and o.id not in state.observed_latency:
        w, h = request_size(request, o)
        dw, dh = parse_size(o.capabilities.default_size)
        steps = float(o.settings.get("steps", 0) or 0)  # type: ignore[arg-type]
        p50 *= ((w * h) / (dw * dh)) ** 1.25 * (request.steps / steps if request.steps and steps else 1.0)
        if request.is_edit:  # img2img and inpainting run the last `strength` of the steps
            p50 *= request.edit_strength
    if o.id in state.cold:
        p50 += float(o.settings.get("load_s", DEFAULT_LOAD_S))  # type: ignore[arg-type]
    return p50


def _scale_reasons(what: str, scales: list[float], most: float) -> list[str]:
    return [f"{what} scale {max(scales):g} above its max of {most:g}"] if max(scales) > most else []


def _control_reasons(caps: Capabilities, r: ImageRequest, c: Constraints, soft: list[str]) -> list[str]:
    """Why the offering cannot follow this request's control images or image prompts (or the policy's rule
    about them); a control setting it would drop goes to `soft`."""
    hard: list[str] = []
    if caps.control_required and not r.control:
        hard.append(f"needs a control image ({', '.join(caps.control)})")
    if missing := [k.kind for k in r.control if k.kind not in caps.control]:
        hard.append(f"no ControlNet for {', '.join(dict.fromkeys(missing))}"
                    + (f" (it has {', '.join(caps.control)})" if caps.control else ""))
    elif len(r.control) > max(caps.max_controls, 1) and caps.control:
        hard.append(f"{len(r.control)} controls above its max of {caps.max_controls}")
    if r.control and caps.control:
        hard += _scale_reasons("control", [k.scale for k in r.control], caps.max_scale)
        if "scale" not in caps.control_settings and any(k.scale != 1.0 for k in r.control):
            soft.append("control scale")
        if "window" not in caps.control_settings and any((k.start, k.end) != (0.0, 1.0) for k in r.control):
            soft.append("control start/end")
    if c.forbid_control and r.control:
        hard.append("control not allowed by the policy (forbid_control)")
    if caps.image_prompts_required and not r.image_prompts:
        hard.append("needs an image prompt (a style reference)")
    if r.image_prompts and not caps.image_prompts:
        hard.append("no image prompts (IP-Adapter)")
    elif len(r.image_prompts) > caps.image_prompts and caps.image_prompts:
        hard.append(f"{len(r.image_prompts)} image prompts above its max of {caps.image_prompts}")
    if r.image_prompts and caps.image_prompts:
        hard += _scale_reasons("image prompt", [p.scale for p in r.image_prompts], caps.max_scale)
    if c.forbid_image_prompts and r.image_prompts:
        hard.append("image prompts not allowed by the policy (forbid_image_prompts)")
    if c.require_control and not caps.control:
        hard.append("no ControlNet (policy requires control)")
    if c.require_image_prompts and not caps.image_prompts:
        hard.append("no image prompts (policy requires them)")
    return hard


def _capability_reasons(o: Offering, r: ImageRequest, c: Constraints, size: tuple[int, int]
                        ) -> tuple[list[str], list[str]]:
    """(hard reasons the offering cannot serve the request, soft fields it would drop); `size` is the
    request's size for this offering (`request_size`)."""
    caps, hard, soft = o.capabilities, [], []
    edit = caps.edit if r.is_edit else None
    if edit is not None and edit.output_size != "asked":  # it returns the init image's size, or its own
        if r.width and (edit.output_size == "any" or (r.width, r.height) != size):
            soft.append("size")
        if edit.output_size == "input" and (problem := caps.size_problem(*size)):
            hard.append(f"init image: {problem}")
    elif r.width and r.height and (problem := caps.size_problem(r.width, r.height)):
        hard.append(problem)
    elif r.aspect_ratio and not r.width:
        w, h = size
        if c.size_match == "exact" and off_ratio(w, h, r.aspect_ratio):
            hard.append(f"aspect ratio {r.aspect_ratio} not offered (nearest: {w}x{h}; the policy's size_match "
                        "is exact)")
        elif problem := caps.size_problem(w, h):
            hard.append(f"aspect ratio {r.aspect_ratio}: {problem}")
    hard += _edit_reasons(o, r, soft)
    if r.n > caps.max_n and not c.split_n:
        hard.append(f"n={r.n} above its max of {caps.max_n} (the policy's split_n is off)")
    if r.adapters and not caps.adapters:
        hard.append("no LoRA/adapter support")
    elif len(r.adapters) > caps.max_adapters and caps.adapters:
        hard.append(f"{len(r.adapters)} adapters above its max of {caps.max_adapters}")
    hard += _control_reasons(caps, r, c, soft)
    if c.require_adapters and not caps.adapters:
        hard.append("no LoRA support (policy requires adapters)")
    if r.background == "transparent" and not caps.transparent_background:
        hard.append("no transparent background")
    if not caps.seed:
        if c.require_seed:
            hard.append("no seed support (policy requires reproducible seeds)")
        elif r.seed is not None:
            soft.append("seed")
    if r.quality and r.quality != "auto":
        if not caps.qualities:
            soft.append("quality")
        elif r.quality not in caps.qualities:
            hard.append(f"quality {r.quality} not offered ({', '.join(caps.qualities)})")
    if r.scheduler and caps.scheduler:
        family = str(o.settings.get("family", "sd"))
        if why := schedulers.problem(r.scheduler, family):
            hard.append(why)
    for name, given, supported in (("negative_prompt", r.negative_prompt, caps.negative_prompt),
                                   ("steps", r.steps, caps.steps),
                                   ("guidance_scale", r.guidance_scale, caps.guidance),
                                   ("scheduler", r.scheduler, caps.scheduler)):
        if given is not None and not supported:
            soft.append(name)
    if r.output_format and r.output_format not in caps.output_formats:
        soft.append("output_format")  # converted locally after the call
    return hard, soft


def _edit_reasons(o: Offering, r: ImageRequest, soft: list[str]) -> list[str]:
    """Why the offering cannot serve this edit (or this text-to-image request); soft fields go to `soft`."""
    edit = o.capabilities.edit
    if not r.is_edit:
        return [] if o.capabilities.text_to_image else ["edit only: needs an input image"]
    if edit is None:
        return ["no image editing (takes no input images)"]
    hard = []
    if len(r.images) > edit.max_images:
        hard.append(f"takes at most {edit.max_images} input image{'s' if edit.max_images > 1 else ''}, "
                    f"{len(r.images)} given")
    if r.mask is not None and not edit.mask:
        hard.append("no mask support")
    elif r.mask is None and edit.mask_required:
        hard.append("needs a mask (an inpainting endpoint)")
    if r.strength is not None and not edit.strength:
        soft.append("strength")
    if o.kind == "local":  # Diffusers denoises int(steps x strength) steps: none is an error, found here
        steps = r.steps or int(o.settings.get("steps") or 25)  # type: ignore[call-overload]
        if int(steps * r.edit_strength) < 1:
            hard.append(f"strength {r.edit_strength:g} x {steps} steps leaves no denoising step")
    return hard


def _split_note(r: ImageRequest, o: Offering) -> str | None:
    top = o.capabilities.max_n
    return None if r.n <= top else f"n={r.n} is sent to {o.id} as {-(-r.n // top)} calls of at most {top}"


def _limits(r: ImageRequest, c: Constraints, state: PlannerState) -> tuple[float, list[tuple[Decimal, str]]]:
    """The latency ceiling and the cost ceilings that apply to this request, computed once per plan."""
    max_latency = min(x for x in (c.max_latency_s, r.max_latency_s, float("inf")) if x is not None)
    limits = [(c.max_cost_per_image_usd, "image"), (c.max_cost_per_call_usd, "call"),
              (r.max_cost_usd, "call (request)"), (state.max_marginal_usd, "call (budget headroom)")]
    return max_latency, [(limit, per) for limit, per in limits if limit is not None]


def _policy_reasons(o: Offering, r: ImageRequest, c: Constraints, cost: Cost, worst: Decimal | None,
                    latency: float, max_latency: float, limits: list[tuple[Decimal, str]]) -> list[str]:
    reasons = []
    need = c.licenses
    if need == "commercial" and o.license.commercial_use != "yes":
        reasons.append(f"license {o.license.name}: commercial use {o.license.commercial_use}")
    elif need == "conditional" and o.license.commercial_use == "no":
        reasons.append(f"license {o.license.name}: non-commercial")
    if c.regions is not None:
        outside = [g for g in o.regions if g not in c.regions]
        if outside:
            reasons.append(f"processes data in {', '.join(outside)}, policy allows "
                           f"{', '.join(c.regions)}")
    if latency > max_latency:
        reasons.append(f"est latency {latency:g} s > max {max_latency:g} s")
    for limit, per in limits:
        if cost.usd is None:
            reasons.append(f"price unknown ({cost.detail}); cannot check max ${limit}/{per.split()[0]}")
            break
        if per == "call (budget headroom)":  # what the budget will reserve: the bound
            if worst is not None and worst > limit:
                reasons.append(f"up to ${worst:.4f}/call > budget headroom ${limit}")
            continue
        value = cost.usd / r.n if per == "image" else cost.usd
        if value > limit:
            reasons.append(f"est ${value:.4f}/{per} > max ${limit}")
    return reasons


def _sort_key(objective: str, cand: Candidate, o: Offering, pref: int):
    usd = cand.estimated_cost.usd
    cost = (0, usd) if usd is not None else (1, Decimal(0))  # unpriced sorts after any priced
    lat = cand.estimated_latency_s or 0.0
    if objective == "fastest":
        return (lat, pref, cost, o.id)
    if objective == "best":
        return (-o.rank, pref, cost, lat, o.id)
    if objective == "ordered":
        return (pref, cost, lat, o.id)
    return (cost, pref, lat, o.id)


def request_key(r: ImageRequest) -> tuple[object, ...]:
    """Every request field the planner reads and nothing else, so requests with equal keys get equal
    plans (a property test holds the planner to this). The one cache of plans (`AsyncBroker`) is keyed
    by it, so nothing else may memoise on request fields. The prompt counts only by its estimated token
    count and the seed only by whether one was given, so the key repeats across real traffic."""
    return (-(-len(r.prompt) // CHARS_PER_TOKEN), r.negative_prompt is None, bool(r.negative_prompt),
            r.width, r.height, r.n, r.seed is None, r.steps, r.guidance_scale is None, r.scheduler,
            r.quality, r.output_format, r.background, r.adapters, r.model, tuple(sorted(r.tags.items())),
            r.aspect_ratio, r.resolution,
            r.max_cost_usd, r.max_latency_s, tuple((i.width, i.height) for i in r.images), r.mask is None,
            r.strength, r.partial_images,
            tuple((k.kind, k.scale, k.start, k.end, k.image.width, k.image.height) for k in r.control),
            tuple(p.scale for p in r.image_prompts))


def plan(request: ImageRequest, policy: Policy, catalog: Catalog, state: PlannerState) -> Plan:
    eff = effective_settings(request, policy)
    c = eff.constraints
    pinned: list[Offering] | None = None
    if request.model:
        pinned = [o for o in catalog if _matches(o, request.model)]
        if not pinned:
            raise RequestError(f"unknown model {request.model!r}: not an offering id, alias or "
                               "provider in the catalog (see `imagebroker providers`)")
    pool = pinned if pinned is not None else list(catalog)   # a retired offering is rejected, saying so
    max_latency, limits = _limits(request, c, state)
    denied, preferred = _first_match(catalog, eff.deny), _first_match(catalog, eff.prefer)
    # demo models come last in every policy that does not prefer them by id (a pattern such as `local`
    # is not enough), as do the policy's own last_resort
    named = set(eff.prefer)
    last_resort = set(_first_match(catalog, policy.last_resort)) | {
        o.id for o in catalog if o.demo and o.id not in named and named.isdisjoint(o.aliases)}
    eligible: list[tuple[Candidate, Offering]] = []
    held: list[tuple[Candidate, Offering]] = []
    rejected: list[Rejection] = []
    for o in pool:  # the catalog is kept sorted by id
        reasons: list[str] = []
        if o.retired(state.today):
            reasons.append(f"retired (shut down {o.shutdown or 'already'})")
        if (d := denied.get(o.id)) is not None:
            reasons.append(f"denied by policy ({eff.deny[d]})")
        why = state.unavailable.get(o.id) or state.unavailable.get(o.provider)
        if why:
            reasons.append(why)
        w, h = request_size(request, o)
        hard, soft = _capability_reasons(o, request, c, (w, h))
        reasons += hard
        device = state.devices.get(o.id, "cuda")
        cost, worst = estimate(request, o, device=device), bound(request, o, device=device)
        latency = latency_estimate(o, state, request)
        reasons += _policy_reasons(o, request, c, cost, worst, latency, max_latency, limits)
        if reasons:
            rejected.append(Rejection(offering=o.id, reasons=tuple(reasons)))
            continue
        notes = [w for w in (o.shutdown_warning(state.today), _split_note(request, o)) if w]
        cand = Candidate(offering=o.id, estimated_cost=cost, estimated_latency_s=round(latency, 3),
                         dropped=tuple(soft), bound_usd=worst, warnings=tuple(notes), size=f"{w}x{h}")
        is_last = pinned is None and o.id in last_resort
        (held if is_last else eligible).append((cand, o))
    if eligible:
        rejected += [Rejection(offering=o.id, reasons=(
            "last resort: used only when no other offering is eligible",)) for _, o in held]
    else:
        eligible = held
    eligible.sort(key=lambda pair: _sort_key(eff.objective, pair[0], pair[1],
                                             preferred.get(pair[1].id, len(eff.prefer))))
    rejected.sort(key=lambda rj: rj.offering)
    return Plan(candidates=tuple(cand for cand, _ in eligible), rejected=tuple(rejected),
                policy=policy.name, rule=eff.rule, objective=eff.objective)
