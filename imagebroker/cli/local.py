"""`imagebroker local deploy|status`: the code rung's models, in this process or on a Ray Serve cluster."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from .common import PolicyOpt, fail, handle_errors, read_only_broker
from .output import console, print_json

if TYPE_CHECKING:
    from ..local_backend import LocalProvider

app = typer.Typer(help="The local models: deploy them on a Ray cluster, see where they run.",
                  no_args_is_help=True)
AddressOpt = Annotated[str | None, typer.Option(
    "--address", help="The Ray cluster (auto, HOST:PORT or ray://HOST:10001); default: the policy's "
                      "local.ray.address, else auto.")]


def _local(policy: str | None) -> LocalProvider:
    return read_only_broker(policy, None).provider("local")  # type: ignore[no-any-return]


def _join(local: LocalProvider, address: str | None) -> str:
    try:
        from ..local_backend import ray_engine
    except ImportError:
        fail("the Ray engine needs the [ray] extra: pip install 'imagebroker[ray]'")
    where = address or local.settings.local.ray.address or "auto"
    try:
        ray_engine.join(local.settings.local, where)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        fail(f"no Ray cluster at {where}: start one with `ray start --head` or set local.ray.address "
             f"in the policy ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
    return where


@app.command("deploy")
@handle_errors
def deploy(policy: PolicyOpt = None, address: AddressOpt = None) -> None:
    """Start or update the policy's Serve application (one deployment per local model) on a running Ray
    cluster, and wait until its replicas run."""
    local = _local(policy)
    models = local.deployed()
    if not models:
        fail("no local model to deploy: declare one in local.models or name them in local.ray.models")
    where = _join(local, address)
    from ..local_backend import ray_engine

    app_name = local.settings.local.ray.app
    console.print(f"deploying {', '.join(sorted(models))} as Serve application {app_name!r} on {where}",
                  markup=False)
    try:
        ray_engine.deploy(local.settings.local, models)
    except RuntimeError as exc:
        failed = ray_engine.deployments(app_name) or {}
        lines = [f"  {name}: {status} {message}" for name, (status, message) in sorted(failed.items())
                 if status != ray_engine.HEALTHY]
        fail("the application did not start:\n" + ("\n".join(lines) or str(exc).splitlines()[0]))
    console.print("running: " + ", ".join(f"{name} ({status})" for name, (status, _) in
                                          sorted((ray_engine.deployments(app_name) or {}).items())), markup=False)


def _inprocess(local: LocalProvider, measure: bool) -> list[dict[str, Any]]:
    from ..local_backend import installed

    models = []
    for m, o in sorted(local.offerings.items()):
        state = local.state(o)
        row: dict[str, Any] = {"model": m, "offering": o.id, "installed": installed(o), "device": state.device,
                               "quantization": o.settings.get("quantization") or "none"}
        if state.unavailable and row["installed"]:
            row["unavailable"] = state.unavailable
        elif measure and row["installed"]:
            loaded, _ = local.runner().pipelines.load(o)
            row["weights_mib"] = round(loaded.bytes / 2**20, 3)
        models.append(row)
    return models


def _replicas(app_name: str) -> list[dict[str, Any]]:
    """Each live replica of the application's model deployments (Serve names its actors
    `SERVE_REPLICA::APP#DEPLOYMENT#TAG`) with what it says of itself: device, host, pid, requests, images.
    A replica is asked through its deployment's handle, which picks one replica per request, so each
    deployment is asked until every replica answered (or 8 tries per replica)."""
    import ray
    from ray import serve

    from ..local_backend.ray_serve import PREFIX

    rows: dict[str, dict[str, Any]] = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        app, _, rest = actor["name"].removeprefix("SERVE_REPLICA::").partition("#")
        name, _, tag = rest.partition("#")
        if actor["name"].startswith("SERVE_REPLICA::") and app == app_name and name.startswith(PREFIX):
            rows[tag] = {"deployment": name, "replica": tag}
    for name in sorted({r["deployment"] for r in rows.values()}):
        handle = serve.get_deployment_handle(name, app_name)
        wanted = {tag for tag, r in rows.items() if r["deployment"] == name}
        for _ in range(8 * len(wanted)):
            if not wanted:
                break
            found = handle.stats.remote().result(timeout_s=10)
            if found["replica"] in rows:
                rows[found["replica"]] |= {k: v for k, v in found.items() if k != "loaded"}
                wanted.discard(found["replica"])
    return sorted(rows.values(), key=lambda r: (r["deployment"], r["replica"]))


@app.command("status")
@handle_errors
def status(policy: PolicyOpt = None, address: AddressOpt = None,
           measure: Annotated[bool, typer.Option(
               "--measure", help="In process: load each installed model here and report its weights' memory.")] = False,
           json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Where the local models run: with the Ray engine, the Serve application's deployments, their
    replicas, devices and weights' memory; in process, the models, whether they are installed, and with
    --measure the memory their weights take once loaded (quantized ones by their int8/int4 data)."""
    local = _local(policy)
    settings = local.settings.local
    if settings.engine != "ray" and address is None:
        models = _inprocess(local, measure)
        if json_out:
            print_json({"engine": "inprocess", "models": models})
            return
        console.print("engine: inprocess (this process's own device)", markup=False)
        for m in models:
            weights = f", weights {m['weights_mib']} MiB" if "weights_mib" in m else ""
            why = f" ({m['unavailable']})" if m.get("unavailable") else ""
            console.print(f"  {m['offering']}: {'installed' if m['installed'] else 'not installed'}, "
                          f"{m['device']}, quantization {m['quantization']}{weights}{why}", markup=False)
        return
    where = _join(local, address)
    from ..local_backend import ray_engine

    found = ray_engine.deployments(settings.ray.app)
    if found is None:
        fail(f"no Serve application {settings.ray.app!r} on {where}: run imagebroker local deploy --policy P")
    replicas = _replicas(settings.ray.app)
    if json_out:
        print_json({"engine": "ray", "address": where, "app": settings.ray.app,
                    "deployments": {n: {"status": s, "message": m} for n, (s, m) in sorted(found.items())},
                    "replicas": replicas})
        return
    console.print(f"engine: ray, application {settings.ray.app!r} on {where}", markup=False)
    for name, (state, message) in sorted(found.items()):
        console.print(f"  {name}: {state}{f' ({message})' if message else ''}", markup=False)
        for r in (r for r in replicas if r["deployment"] == name):
            console.print(f"    replica {r['replica']} pid {r.get('pid', '?')} on {r.get('host', '?')}: "
                          f"{r.get('device', '?')}, {r.get('requests', 0)} requests, {r.get('images', 0)} images",
                          markup=False)
