"""A Diffusers scheduler from a name people know, for a model family (the table is data, in
`providers/schedulers.py`, so the planner checks names without importing diffusers)."""

from __future__ import annotations

from typing import Any

from ..providers.schedulers import FAMILY_KIND, all_names, problem, resolve

__all__ = ["all_names", "build", "problem"]


def build(name: str, family: str, base_config: Any) -> Any:
    import diffusers

    found = resolve(name, family)
    if found is None:
        raise ValueError(problem(name, family))
    cls_name, kwargs = found
    cls = getattr(diffusers, cls_name)
    if FAMILY_KIND.get(family) == "flow" and cls_name != "FlowMatchEulerDiscreteScheduler":
        return cls(**kwargs)  # flow sigmas come from kwargs, not the flow-match config
    return cls.from_config(base_config, **kwargs)
