"""ComfyUI as a real 0.8.0 server answers (shared research/comfyui-real-server): the provider's behaviour on
each difference the research found, the fake brought to the real protocol, and a pool of servers."""

from __future__ import annotations

import asyncio
import io
import json
import time
from decimal import Decimal

import httpx
import pytest
from PIL import Image

pytest.importorskip("aiohttp")

from imagebroker import Broker
from imagebroker.errors import AllAttemptsFailed
from imagebroker.policies.schema import Policy
from imagebroker.testing.fakes.comfyui import WORKFLOW, FakeComfyUI
from tests.conftest import builtin_providers

HOSTED = builtin_providers("comfyui")
EMPTY_IMAGE = {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1,
                                                            "color": 16711680}},
               "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "ib_red"}}}


def workflow(tmp_path, graph: dict, name: str = "wf.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(graph))
    return str(path)


def broker(tmp_path, urls: list[str], graph: dict = WORKFLOW, **extra) -> Broker:
    server = {"base_url": urls[0]} if len(urls) == 1 else {"base_urls": urls}
    policy = Policy.model_validate({
        "name": "c", "deny": [*HOSTED, "comfyui/flux-schnell"],
        "local": {"gpu_usd_per_hour": "3.60", "cpu_usd_per_hour": "0.10"},
        "providers": {"comfyui": {**server, "poll_interval_s": 0.05,
                                  "options": {"workflow": workflow(tmp_path, graph)}}},
        "retry": {"initial_delay_s": 0.01}, **extra})
    return Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}", store=False)


def posted_prompts(fake: FakeComfyUI) -> list[dict]:
    return [json.loads(r["body"]) for r in fake.requests if r["path"] == "/prompt"]


# -- 1. the provider, right against the real protocol -----------------------------------------------------
def test_a_graph_with_nothing_to_bind_is_refused_before_it_runs(tmp_path):
    with FakeComfyUI() as fake, broker(tmp_path, [fake.url], EMPTY_IMAGE) as b, \
            pytest.raises(AllAttemptsFailed, match="no KSampler to bind the prompt, seed and size"):
        b.generate("a cat", size="512x512")
    assert posted_prompts(fake) == []   # never a silent success at the wrong size


def test_a_batch_has_one_seed_as_comfyui_draws_it(tmp_path):
    with FakeComfyUI() as fake, broker(tmp_path, [fake.url]) as b:
        batch = b.generate("a cat", size="256x256", n=2, seed=5)
        alone = b.generate("a cat", size="256x256", seed=6)
    assert [i.seed for i in batch.images] == [5, None]
    assert batch.applied["batch_seeds"] == "one seed for the batch"
    assert batch.images[1].data != alone.images[0].data   # batch image 1 is not seed 6's image
    assert alone.images[0].seed == 6


PARTIAL = WORKFLOW | {"20": {"class_type": "EmptyImage", "inputs": {"width": 99999, "height": 64, "batch_size": 1,
                                                                    "color": 0}},
                      "21": {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": "bad"}}}


def test_a_200_with_node_errors_is_stopped_and_its_server_time_recorded(tmp_path):
    with FakeComfyUI() as fake, broker(tmp_path, [fake.url], PARTIAL, retry={"max_attempts": 1}) as b, \
            pytest.raises(AllAttemptsFailed) as exc:
        b.generate("a cat", size="256x256", seed=1)
    (attempt,) = exc.value.attempts
    assert "ComfyUI skipped outputs: node 20 (EmptyImage): value_bigger_than_max: Value 99999 bigger than max of " \
           "16384 (width)" in attempt.error
    pid = posted_prompts(fake)[0]["prompt_id"]
    assert fake.interrupted == [pid] and fake.deleted == [pid] and attempt.provider_request_id == pid
    assert attempt.cost is not None and attempt.cost.status == "priced" and "gpu_seconds" in attempt.cost.units


def test_only_the_images_the_workflow_saves_are_returned(tmp_path):
    with_preview = WORKFLOW | {"10": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}}
    with FakeComfyUI() as fake, broker(tmp_path, [fake.url], with_preview) as b:
        r = b.generate("a cat", size="256x256", n=2)
    assert len(r.images) == 2 and r.cost.units["images"] == 2
    assert any(k.startswith("temp/") for k in fake.files)   # the preview was made, and left alone


def test_an_offerings_own_workflow_wins_over_the_providers(tmp_path):
    own = WORKFLOW | {"9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "own", "images": ["8", 0]}}}
    with FakeComfyUI() as fake, broker(tmp_path, [fake.url], offerings=[
            {"id": "comfyui/sdxl", "settings": {"workflow": workflow(tmp_path, own, "own.json")}}]) as b:
        b.generate("a cat", size="256x256")
    assert posted_prompts(fake)[0]["prompt"]["9"]["inputs"]["filename_prefix"] == "own"


def test_a_cpu_server_is_priced_at_the_cpu_rate(tmp_path):
    with FakeComfyUI(device="cpu") as fake, broker(tmp_path, [fake.url]) as b:
        r = b.generate("a cat", size="256x256")
        planned = b.plan("a cat", size="256x256").candidates[0]
    seconds = Decimal(str(r.cost.units["gpu_seconds"]))
    assert r.cost.units["device"] == "cpu" and r.applied["device"] == "cpu"
    assert r.cost.usd == (seconds * Decimal("0.10") / 3600).quantize(Decimal("1e-9")).normalize()
    assert planned.estimated_cost.units["device"] == "cpu"   # the planner knows it from then on


def test_the_polling_path_reads_and_retries_failures_as_the_websocket_path_does(tmp_path):
    with FakeComfyUI(["oom", "ok"]) as fake, broker(tmp_path, [fake.url]) as b:
        over_ws = b.generate("a cat", size="256x256").attempts[0].error
    with FakeComfyUI(["nows+oom", "nows"]) as fake, broker(tmp_path, [fake.url]) as b:
        r = b.generate("a cat", size="256x256")
    assert [a.error_type for a in r.attempts] == ["ProviderUnavailable", None]
    assert r.attempts[0].error == over_ws == ("ComfyUI node 3 (KSampler): torch.OutOfMemoryError: CUDA out of "
                                              "memory. Tried to allocate 2.00 GiB.")


def test_a_cpu_out_of_memory_is_retried_too(tmp_path):
    with FakeComfyUI(["cpu_oom", "ok"]) as fake, broker(tmp_path, [fake.url]) as b:
        r = b.generate("a cat", size="256x256")
    assert "DefaultCPUAllocator: not enough memory" in r.attempts[0].error and len(r.attempts) == 2


def test_a_websocket_that_never_upgrades_falls_back_to_polling(tmp_path, monkeypatch):
    from imagebroker.providers.comfyui import provider

    monkeypatch.setattr(provider, "WS_CONNECT_S", 0.3)
    with FakeComfyUI(["noupgrade"]) as fake, broker(tmp_path, [fake.url], timeout_s=20) as b:
        t0 = time.monotonic()
        r = b.generate("a cat", size="256x256")
    assert len(r.images) == 1 and time.monotonic() - t0 < 5


@pytest.mark.parametrize("graph, says", [
    (WORKFLOW | {"3": {**WORKFLOW["3"], "inputs": {**WORKFLOW["3"]["inputs"], "cfg": 999}}},
     "node 3 (KSampler): value_bigger_than_max: Value 999 bigger than max of 100 (cfg)"),
    (WORKFLOW | {"12": {"class_type": "NoSuchNode", "inputs": {}}},
     "Cannot execute because node NoSuchNode does not exist. (Node ID '#12')"),
])
def test_validation_messages_keep_comfyuis_message_and_the_node(tmp_path, graph, says):
    with FakeComfyUI() as fake, broker(tmp_path, [fake.url], graph) as b, pytest.raises(AllAttemptsFailed) as exc:
        b.generate("a cat", size="256x256")
    assert says in exc.value.attempts[0].error and len(exc.value.attempts) == 1


def test_model_load_time_is_not_charged_as_generation_time(tmp_path):
    with FakeComfyUI(load_s=0.4) as fake, broker(tmp_path, [fake.url]) as b:
        first = b.generate("a cat", size="256x256", seed=1)
        second = b.generate("a cat", size="256x256", seed=2)   # the checkpoint node is cached now
    assert first.cost.units["load_seconds"] >= 0.35 and second.cost.units["load_seconds"] < 0.1
    assert first.cost.units["gpu_seconds"] < 0.35   # 20 sampler steps of 5 ms, not the load
    assert second.cost.units["cached_nodes"] >= 1


def test_a_timed_out_attempt_records_its_prompt_id_and_the_server_time_it_used(tmp_path):
    with FakeComfyUI(["timeout"]) as fake, broker(tmp_path, [fake.url], timeout_s=0.6,
                                                  retry={"max_attempts": 1}) as b, \
            pytest.raises(AllAttemptsFailed) as exc:
        b.generate("a cat", size="256x256")
    (attempt,) = exc.value.attempts
    pid = posted_prompts(fake)[0]["prompt_id"]
    assert attempt.error_type == "OutcomeUnknown" and attempt.provider_request_id == pid
    assert attempt.cost.status == "priced" and 0 < attempt.cost.units["gpu_seconds"] < 3
    assert "used:" in attempt.cost.detail


def test_a_finished_run_whose_images_cannot_be_fetched_is_not_run_again_and_is_charged(tmp_path):
    with FakeComfyUI(["view_down"]) as fake, broker(tmp_path, [fake.url]) as b, \
            pytest.raises(AllAttemptsFailed) as exc:
        b.generate("a cat", size="256x256")
    (attempt,) = exc.value.attempts   # never a second run for the same images
    assert attempt.error_type == "OutcomeUnknown" and "could not be fetched" in attempt.error
    assert len(posted_prompts(fake)) == 1
    assert attempt.cost.status == "priced" and attempt.cost.units["gpu_seconds"] > 0


def test_an_edit_asking_what_the_graph_cannot_bind_is_refused_before_it_runs(tmp_path):
    from imagebroker.testing.fakes.comfyui import WORKFLOW_IMG2IMG

    init = io.BytesIO()
    Image.new("RGB", (256, 256)).save(init, format="PNG")
    with FakeComfyUI() as fake, broker(tmp_path, [fake.url], WORKFLOW_IMG2IMG, offerings=[
            {"id": "comfyui/sdxl", "capabilities": {"edit": {"max_images": 1, "strength": True}}}]) as b:
        with pytest.raises(AllAttemptsFailed, match="n=2: the workflow has no EmptyLatentImage batch_size"):
            b.generate("a cat", images=[init.getvalue()], n=2)
        with pytest.raises(AllAttemptsFailed, match="512x512 cannot be made"):
            b.generate("a cat", images=[init.getvalue()], size="512x512")
    assert posted_prompts(fake) == []


# -- 3. a pool of servers -------------------------------------------------------------------------------
def test_the_pool_sends_a_call_to_the_least_loaded_server(tmp_path):
    with FakeComfyUI(["timeout"]) as busy, FakeComfyUI() as idle:
        busy.timeout_s = 5.0
        for _ in range(2):   # two long prompts queued on the first server
            httpx.post(f"{busy.url}/prompt", json={"prompt": WORKFLOW, "client_id": "other"})
        with broker(tmp_path, [busy.url, idle.url]) as b:
            r = b.generate("a cat", size="256x256")
    assert r.applied["server"] == idle.url and posted_prompts(idle)


def test_the_pool_fails_over_to_another_server_before_another_offering(tmp_path):
    with FakeComfyUI() as alive:
        dead = "http://127.0.0.1:9"   # nothing listens there
        with broker(tmp_path, [dead, alive.url]) as b:
            r = b.generate("a cat", size="256x256")
            again = b.generate("a cat", size="256x256")
    assert r.applied["server"] == alive.url and len(r.attempts) == 1 and r.offering == "comfyui/sdxl"
    assert again.applied["server"] == alive.url   # the dead one is marked down, not tried first again


def test_the_pool_fails_over_when_a_server_answers_500_before_queueing(tmp_path):
    with FakeComfyUI(["500"]) as failing, FakeComfyUI() as other, broker(tmp_path, [failing.url, other.url]) as b:
        r = b.generate("a cat", size="256x256")
    assert r.applied["server"] == other.url and len(r.attempts) == 1
    assert len(posted_prompts(failing)) == 1 and failing.history == {} and not failing.pending   # 500: not queued


def test_a_failed_server_stays_down_rather_than_back_after_its_next_status_check(tmp_path):
    with FakeComfyUI(["500"]) as failing, FakeComfyUI() as other, broker(tmp_path, [failing.url, other.url]) as b:
        b.generate("a cat", size="256x256")
        time.sleep(2.2)   # past the status refresh, within the 10 s it is kept down
        again = b.generate("a cat", size="256x256")
    assert again.applied["server"] == other.url and len(posted_prompts(failing)) == 1


# -- 2. the fake brought to the real protocol --------------------------------------------------------------
def post(fake: FakeComfyUI, body: dict) -> httpx.Response:
    return httpx.post(f"{fake.url}/prompt", json=body)


def wait_history(fake: FakeComfyUI, pid: str) -> dict:
    for _ in range(100):
        record = httpx.get(f"{fake.url}/history/{pid}").json().get(pid)
        if record:
            return record
        time.sleep(0.05)
    raise AssertionError("no history")


def test_the_fake_answers_validation_as_comfyui_does():
    with FakeComfyUI() as fake:
        unknown = post(fake, {"prompt": {"1": {"class_type": "NoSuchNodeXYZ", "inputs": {}}}})
        assert unknown.status_code == 400 and unknown.json() == {"error": {
            "type": "invalid_prompt", "message": "Cannot execute because node NoSuchNodeXYZ does not exist.",
            "details": "Node ID '#1'", "extra_info": {}}, "node_errors": {}}
        missing = post(fake, {"client_id": "x"})
        assert missing.status_code == 400 and missing.json()["error"]["type"] == "no_prompt"
        wide = {**EMPTY_IMAGE["1"]["inputs"], "width": 99999}
        bad = {**EMPTY_IMAGE, "1": {"class_type": "EmptyImage", "inputs": wide}}
        out_of_range = post(fake, {"prompt": bad}).json()
        err = out_of_range["node_errors"]["1"]["errors"][0]
        assert err["message"] == "Value 99999 bigger than max of 16384" and err["details"] == "width"
        partial = post(fake, {"prompt": {**EMPTY_IMAGE, "3": bad["1"], "4": {
            "class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "b"}}}})
        assert partial.status_code == 200 and set(partial.json()["node_errors"]) == {"3"}
        assert partial.json()["number"] == 0   # a server-wide counter, from 0
        record = wait_history(fake, partial.json()["prompt_id"])
        assert list(record["outputs"]) == ["2"]   # the valid part ran


def test_the_fake_runs_model_free_graphs_and_names_files_as_comfyui_does():
    with FakeComfyUI() as fake:
        graph = {**EMPTY_IMAGE, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                                            "filename_prefix": "sub/ib_red"}},
                 "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
        first = wait_history(fake, post(fake, {"prompt": graph, "client_id": "c"}).json()["prompt_id"])
        again = wait_history(fake, post(fake, {"prompt": graph, "client_id": "c"}).json()["prompt_id"])
    saved = first["outputs"]["2"]["images"][0]
    assert saved == {"filename": "ib_red_00001_.png", "subfolder": "sub", "type": "output"}
    assert first["outputs"]["3"]["images"][0]["type"] == "temp"
    assert again["outputs"]["2"] == first["outputs"]["2"]   # an identical graph: from cache, the same file
    cached = next(m[1]["nodes"] for m in again["status"]["messages"] if m[0] == "execution_cached")
    assert set(cached) == {"1", "2", "3"}
    assert set(first) == {"prompt", "outputs", "status", "meta"} and "create_time" in first["prompt"][3]
    image = Image.open(io.BytesIO(fake.files["output/sub/ib_red_00001_.png"]))
    assert image.size == (64, 48) and image.getpixel((0, 0)) == (255, 0, 0)


def test_the_fake_view_honours_type_and_subfolder_and_refuses_escapes():
    with FakeComfyUI() as fake:
        graph = {**EMPTY_IMAGE, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                                            "filename_prefix": "s/x"}}}
        wait_history(fake, post(fake, {"prompt": graph}).json()["prompt_id"])
        view = f"{fake.url}/view"
        ok = httpx.get(view, params={"filename": "x_00001_.png", "subfolder": "s", "type": "output"})
        assert ok.status_code == 200 and ok.headers["content-disposition"] == 'filename="x_00001_.png"'
        assert httpx.get(view, params={"filename": "x_00001_.png", "type": "output"}).status_code == 404
        assert httpx.get(view, params={"filename": "x_00001_.png", "subfolder": "s", "type": "temp"}).status_code == 404
        assert httpx.get(view, params={"filename": "../x.png"}).status_code == 400
        assert httpx.get(view, params={"filename": "x.png", "subfolder": "../.."}).status_code == 403


def test_the_fake_websocket_speaks_the_real_message_types():
    import aiohttp

    async def go(fake: FakeComfyUI) -> list[dict]:
        ws_url = f"{fake.url.replace('http', 'ws')}/ws?clientId=c"
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url) as ws:
            pid = (await (await session.post(f"{fake.url}/prompt", json={"prompt": WORKFLOW, "client_id": "c"})
                          ).json())["prompt_id"]
            seen = []
            async for msg in ws:
                event = json.loads(msg.data)
                seen.append(event)
                if event["type"] == "executing" and event["data"]["node"] is None and \
                        event["data"].get("prompt_id") == pid:
                    return seen
        return seen

    with FakeComfyUI() as fake:
        seen = asyncio.run(go(fake))
    kinds = [e["type"] for e in seen]
    assert kinds[0] == "status" and "sid" in seen[0]["data"]
    assert any(e["type"] == "status" and "sid" not in e["data"] for e in seen[1:])
    assert kinds.index("execution_start") < kinds.index("execution_cached") < kinds.index("progress_state")
    assert {e["data"]["node"] for e in seen if e["type"] == "progress"} == {"3"}   # samplers only
    assert "display_node" in next(e["data"] for e in seen if e["type"] == "executing")
    assert "timestamp" in next(e["data"] for e in seen if e["type"] == "execution_success")


def test_the_fake_interrupts_only_what_runs_and_deletes_only_what_waits():
    with FakeComfyUI(["timeout"]) as fake:
        fake.timeout_s = 3.0
        running = post(fake, {"prompt": WORKFLOW}).json()["prompt_id"]
        waiting = post(fake, {"prompt": WORKFLOW | {"5": {**WORKFLOW["5"], "inputs": {
            **WORKFLOW["5"]["inputs"], "width": 512}}}}).json()["prompt_id"]
        time.sleep(0.2)
        queue = httpx.get(f"{fake.url}/queue").json()
        assert [r[1] for r in queue["queue_running"]] == [running]
        assert [r[1] for r in queue["queue_pending"]] == [waiting]
        httpx.post(f"{fake.url}/interrupt", json={"prompt_id": waiting})     # not running: nothing happens
        httpx.post(f"{fake.url}/queue", json={"delete": [running]})          # running: not deleted
        assert [r[1] for r in httpx.get(f"{fake.url}/queue").json()["queue_running"]] == [running]
        httpx.post(f"{fake.url}/queue", json={"delete": [waiting]})
        httpx.post(f"{fake.url}/interrupt", json={"prompt_id": running})
        record = wait_history(fake, running)
        assert record["status"]["status_str"] == "error" and record["prompt"][1] == running
        assert any(m[0] == "execution_interrupted" for m in record["status"]["messages"])
        assert httpx.get(f"{fake.url}/history/{waiting}").json() == {}
        assert running in httpx.get(f"{fake.url}/history").json()
        assert httpx.get(f"{fake.url}/queue", headers={"Origin": "http://evil.example"}).status_code == 403
        stats = httpx.get(f"{fake.url}/system_stats").json()
        assert stats["devices"][0]["type"] == "cuda" and "KSampler" in httpx.get(f"{fake.url}/object_info").json()
