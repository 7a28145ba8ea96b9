"""Scheduler names people know (A1111 / Diffusers docs) -> Diffusers classes, per model family.

The table is plain data beside the providers, so the planner can reject a scheduler that does not fit a
model's family before anything runs; the local backend builds the scheduler from it
(`local_backend/runner.py`, the only place that imports diffusers).
"""

from __future__ import annotations

from typing import Any

# Epsilon / v-prediction UNet models: SD 1.x/2.x, SDXL.
KARRAS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++",
                                                        "use_karras_sigmas": True}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                            "use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    # ComfyUI's dpmpp_sde without the SDE noise (Diffusers' DPMSolverSDEScheduler needs torchsde)
    "dpmpp_sde": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++"}),
}
# Sigma schedules, as ComfyUI names them, appended to a name (`euler+karras`), for the classes that take them
# (read from Diffusers 0.42's constructors); `normal` is the scheduler's own
_SIGMAS = ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
           "HeunDiscreteScheduler", "LMSDiscreteScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
           "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")
_SPACING = (*(c for c in _SIGMAS if c != "DPMSolverSinglestepScheduler"), "EulerAncestralDiscreteScheduler",
            "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LCMScheduler")
SCHEDULES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "karras": ({"use_karras_sigmas": True}, _SIGMAS),
    "exponential": ({"use_exponential_sigmas": True}, _SIGMAS),
    "sgm_uniform": ({"timestep_spacing": "trailing"}, _SPACING),
    "simple": ({"timestep_spacing": "trailing"}, _SPACING),
}
# Flow-matching transformers: FLUX (which passes sigmas and mu) and SD3.
_FLOW_DPM = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
FLOW: dict[str, tuple[str, dict[str, Any]]] = {
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", _FLOW_DPM),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {**_FLOW_DPM, "use_dynamic_shifting": True,
                                                 "time_shift_type": "exponential"}),
}
SD3_ONLY = {"flow_heun": ("FlowMatchHeunDiscreteScheduler", {})}  # FLUX passes sigmas: Heun refuses
FAMILY_KIND = {"sd": "karras", "sdxl": "karras", "flux": "flow", "sd3": "flow"}


def table(family: str) -> dict[str, tuple[str, dict[str, Any]]]:
    if FAMILY_KIND.get(family) == "flow":
        return {**FLOW, **(SD3_ONLY if family == "sd3" else {})}
    return KARRAS


def all_names() -> list[str]:
    return sorted(set(KARRAS) | set(FLOW) | set(SD3_ONLY))


def resolve(name: str, family: str) -> tuple[str, dict[str, Any]] | None:
    """The Diffusers class and arguments for `name` (or `name+schedule`) on this family, or None."""
    base, _, schedule = name.partition("+")
    found = table(family).get(base)
    if found is None or (schedule and (schedule not in SCHEDULES or found[0] not in SCHEDULES[schedule][1])):
        return None
    return found[0], {**found[1], **(SCHEDULES[schedule][0] if schedule else {})}


def problem(name: str, family: str) -> str | None:
    """None if `name` runs on this family; otherwise why not, and what would."""
    names = table(family)
    if resolve(name, family) is not None:
        return None
    base, _, schedule = name.partition("+")
    if schedule and base in names:
        takes = [k for k, (_, classes) in SCHEDULES.items() if names[base][0] in classes]
        return (f"scheduler {base!r} takes no {schedule!r} schedule (it takes: "
                f"{', '.join(['normal', *takes]) if takes else 'none'})")
    name = base
    if name not in all_names():
        return f"unknown scheduler {name!r} (known: {', '.join(all_names())})"
    return (f"scheduler {name!r} does not fit a {family} model "
            f"({'flow-matching' if FAMILY_KIND.get(family) == 'flow' else 'epsilon'}); "
            f"use one of: {', '.join(sorted(names))}")
