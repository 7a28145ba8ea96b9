"""Names in a policy that name nothing. A typo there is silent in effect: `deny: [gogle]` denies nothing,
`prefer: [openai/gpt-image-9]` prefers nothing, a budget scoped to `provider: opnai` never counts, and
`regions: [eu-wset]` rejects every offering. Each such name is a problem, found when the broker is made,
before anything is paid for. Pure: a policy and a catalog in, problems out."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable

from .._yaml import Located
from ..providers.catalog import Catalog
from .planner import _matches
from .schema import Policy

Path_ = tuple[str | int, ...]


def _hint(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(set(known)), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def name_problems(policy: Policy, catalog: Catalog, providers: Iterable[str]) -> list[tuple[Path_, str]]:
    """Every name in `policy` that matches nothing in `catalog` (offering patterns), in `providers` (the
    installed provider adapters) or in the catalog's regions, as (field path, problem)."""
    problems: list[tuple[Path_, str]] = []
    installed = set(providers) | {o.provider for o in catalog}
    names = {o.id for o in catalog} | installed | {a for o in catalog for a in o.aliases}
    regions = ({r for o in catalog for r in o.regions}
               | {r for o in catalog for option in o.region_options.values() for r in option.regions})

    def offerings(path: Path_, patterns: Iterable[str] | None) -> None:
        for i, pattern in enumerate(patterns or ()):   # an installed provider is a name, offerings or not
            if pattern not in installed and not any(_matches(o, pattern) for o in catalog):
                problems.append(((*path, i), f"{pattern!r} matches no offering, alias or provider in the "
                                             f"catalog{_hint(pattern, names)}"))

    def known_regions(path: Path_, given: Iterable[str] | None) -> None:
        for i, region in enumerate(given or ()):
            if region not in regions:
                problems.append(((*path, i), f"no offering processes in region {region!r}"
                                             f"{_hint(region, regions)}; regions: {', '.join(sorted(regions))}"))

    offerings(("prefer",), policy.prefer)
    offerings(("deny",), policy.deny)
    offerings(("last_resort",), policy.last_resort)
    known_regions(("constraints", "regions"), policy.constraints.regions)
    for j, rule in enumerate(policy.rules):
        offerings(("rules", j, "set", "prefer"), rule.set.prefer)
        offerings(("rules", j, "set", "deny"), rule.set.deny)
        if rule.when.model is not None and not any(_matches(o, rule.when.model) for o in catalog):
            problems.append((("rules", j, "when", "model"), f"{rule.when.model!r} matches no offering, alias "
                                                            f"or provider{_hint(rule.when.model, names)}"))
        if rule.set.constraints is not None:
            known_regions(("rules", j, "set", "constraints", "regions"), rule.set.constraints.regions)
    for name in policy.providers:
        if name not in installed:
            problems.append((("providers", name), f"no provider named {name!r} is installed"
                                                  f"{_hint(name, installed)}"))
    for j, budget in enumerate(policy.budgets):
        scope = budget.scope
        if scope.provider is not None and scope.provider not in installed:
            problems.append((("budgets", j, "scope", "provider"), f"no provider named {scope.provider!r}"
                                                                  f"{_hint(scope.provider, installed)}"))
        if scope.offering is not None and not any(fnmatch.fnmatchcase(o.id, scope.offering) for o in catalog):
            problems.append((("budgets", j, "scope", "offering"), f"no offering {scope.offering!r} in the "
                                                                  f"catalog{_hint(scope.offering, names)}"))
    return problems


def check_names(policy: Policy, catalog: Catalog, providers: Iterable[str]) -> None:
    """Raise a ConfigError listing every name in `policy` that names nothing, at its file and line when
    the policy was read from a file."""
    problems = name_problems(policy, catalog, providers)
    if problems:
        located = policy._located or Located({}, {}, f"<policy {policy.name}>")
        problems.sort(key=lambda problem: located.line(problem[0]) or 0)
        raise located.problems_error(problems)
