"""`imagebroker comfyui run|convert`: a ComfyUI workflow without a ComfyUI server. `run` gives each SaveImage
output to the local backend as one call (routed, priced and recorded like any other); `convert` prints the
equivalent Diffusers Python."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import LedgerError
from ..providers.comfyui.compile import Job, checkpoint_offering, compile_workflow
from ..types import ImageRequest
from .common import JsonOpt, LedgerOpt, PolicyOpt, fail, handle_errors, read_only_broker
from .generate import NoStoreOpt, OutOpt, check_out, result_json, save_paid
from .output import console, print_json, usd

app = typer.Typer(help="ComfyUI workflows without a server: run one on the local backend, or convert it to "
                       "Diffusers Python.", no_args_is_help=True)
WorkflowArg = Annotated[Path, typer.Argument(help="An API-format workflow (ComfyUI's Export (API)).")]


def _jobs(workflow: Path, catalog: Any, options: dict[str, Any]) -> list[tuple[Job, str]]:
    """Each output of the workflow and the local offering its checkpoint stands for, every problem found
    before anything runs."""
    try:
        graph = json.loads(workflow.read_text())
    except FileNotFoundError:
        fail(f"{workflow}: file not found")
    except (OSError, ValueError) as exc:
        fail(f"{workflow}: not a JSON workflow ({exc})")
    local = [o.id for o in catalog if o.provider == "local"]
    return [(job, checkpoint_offering(job.checkpoint, local, dict(options.get("checkpoints") or {})))
            for job in compile_workflow(graph, workflow.parent)]


@app.command("run")
@handle_errors
def run(workflow: WorkflowArg, out: OutOpt = Path("."), policy: PolicyOpt = None, ledger: LedgerOpt = None,
        no_store: NoStoreOpt = False, json_out: JsonOpt = False) -> None:
    """Run WORKFLOW on the local backend: each SaveImage output is one call with the prompt, size, seed,
    steps, cfg, sampler and LoRAs the workflow names; the images go into --out as `generate` writes them."""
    from ..broker.sync import Broker

    check_out(out)
    with Broker(policy, ledger, store=not no_store) as broker:
        jobs = _jobs(workflow, broker.catalog, broker.policy.provider("comfyui").options)
        requests = [(job, ImageRequest(**job.fields, model=offering, tags={"workflow": workflow.name[:200]}))
                    for job, offering in jobs]
        outputs, unrecorded = [], None
        for job, request in requests:
            try:
                result = broker.generate(request)
            except LedgerError as exc:
                if exc.result is None:
                    raise
                result, unrecorded = exc.result, exc   # paid for: write the images, then say so
            images = save_paid(result, request, out, store_prompt=broker.policy.ledger.store_prompts)
            outputs.append((job, result, images))
    if json_out:
        print_json({"workflow": str(workflow), "outputs": [
            {"node": job.node, "workflow": job.workflow, **result_json(result, images)}
            for job, result, images in outputs]})
    else:
        for job, result, images in outputs:
            w = job.workflow
            for img in images:
                console.print(f"node {job.node}: wrote {img['path']} ({img['width']}x{img['height']}, seed "
                              f"{img['seed']})", markup=False)
            console.print(f"node {job.node}: {result.offering}, {w['sampler_name']}/{w['scheduler']}, {w['steps']} "
                          f"steps, cfg {w['cfg']}  cost {usd(result.cost.usd)} ({result.cost.status})  latency "
                          f"{result.latency_s:.2f} s", markup=False)
    if unrecorded is not None:
        raise unrecorded


@app.command("convert")
@handle_errors
def convert(workflow: WorkflowArg, policy: PolicyOpt = None) -> None:
    """Print WORKFLOW as the equivalent Diffusers Python (the models as the policy declares them)."""
    from ..local_backend.sources import resolve_source
    from ..providers.comfyui.convert import to_python

    broker = read_only_broker(policy, None)
    triples = []
    for job, offering_id in _jobs(workflow, broker.catalog, broker.policy.provider("comfyui").options):
        offering = broker.catalog.resolve(offering_id)
        source = str(offering.settings.get("source", offering.model))
        kind, path = resolve_source(source)
        shown = str(path) if kind == "builtin" and path is not None else source
        triples.append((job, shown, str(offering.settings.get("family") or "sd")))
    typer.echo(to_python(triples), nl=False)
