"""ComfyUI-Distributed (robertvoy/ComfyUI-Distributed) running the pack's workflows on a master
and one worker: two real ComfyUI servers on 127.0.0.1, each with the pack, a copy of
ComfyUI-Distributed and the stand-in models (tests/harness/standins.py).

Optional: XCTRL_DISTRIBUTED_DIR names a checkout of ComfyUI-Distributed (or it sits in the
ComfyUI's custom_nodes); without one this module is skipped in one line. Slow (two servers, the
SD1.5 and SVD stand-ins), so it runs where the workflow server runs do (XCTRL_SERVER_WORKFLOWS=1).

What it guards: a participant's images depend on its seed alone. A prompt with Distributed Seed
(feeding every seed input) and Distributed Collector (before the save) is queued through the
master's POST /distributed/queue; the master runs it with the seed, the worker with seed + 1
(ComfyUI-Distributed gives the i-th enabled worker seed + i + 1) and sends its images to the
master as 8-bit PNGs, and the master saves its own images followed by the worker's. Each of them
must be bit-equal, decoded from the saved PNGs, to what the same prompt without the distributed
nodes saves for that seed on one plain server. The references run on the *other* server, after it
has run other prompts: state the pack kept between prompts (a cache keyed by object id) or a
draw from a process-wide random generator would change an image.
"""
import concurrent.futures
import copy
import os
import shutil
import time

import pytest

from harness import standins
from example_workflows import ui_format
from harness import workflow_runs
from harness.server import ComfyServer

ROOT = os.environ.get("XCTRL_COMFYUI_ROOT")
FOLDER = "ComfyUI-Distributed"


def _distributed_checkout(comfy_root):
    for folder in (os.environ.get("XCTRL_DISTRIBUTED_DIR"), comfy_root and os.path.join(comfy_root, "custom_nodes", FOLDER)):
        if folder and os.path.isfile(os.path.join(folder, "nodes", "collector.py")):
            return folder
    return None


DIST_DIR = _distributed_checkout(ROOT)
if ROOT and DIST_DIR is None:
    pytest.skip("!!! ComfyUI-Distributed is not installed here: set XCTRL_DISTRIBUTED_DIR to a checkout of "
                "robertvoy/ComfyUI-Distributed to run the master + worker tests !!!", allow_module_level=True)
if ROOT and os.environ.get("XCTRL_SERVER_WORKFLOWS", "1") != "1":
    pytest.skip("the master + worker runs happen on the primary ComfyUI only (XCTRL_SERVER_WORKFLOWS=1 to run them here)",
                allow_module_level=True)

WORKER_ID = "1"
SEED = 1234
SEED_NODE, COLLECTOR_NODE, SAVE_NODE = "9001", "9002", "9003"
RUN_TIMEOUT = 1500  # seconds for one prompt on this shared 2-core CPU (both servers busy at once)
SAVERS = ("SaveImage", "SaveAnimatedWEBP")


def _distributed_can_queue():
    """ComfyUI-Distributed validates and queues prompts itself: it awaits
    execution.validate_prompt(prompt_id, prompt, partial_execution_list)."""
    import inspect

    import execution

    fn = getattr(execution, "validate_prompt", None)
    return fn is not None and inspect.iscoroutinefunction(fn) and len(inspect.signature(fn).parameters) >= 3


def _server(comfy_root, standin_dir, is_worker):
    """A server with the stand-ins, the workflows' input files and its own copy of ComfyUI-Distributed
    (whose config file, gpu_config.json, lives in its folder: the checkout is never written)."""
    env = {"XCTRL_OFFLINE": "1", "COMFYUI_IS_WORKER": "1" if is_worker else ""}
    srv = ComfyServer(comfy_root, env=env)
    shutil.copytree(DIST_DIR, os.path.join(srv.base, "custom_nodes", FOLDER),
                    ignore=shutil.ignore_patterns(".git", "gpu_config.json", "tests", "node_modules"))
    standins.link_into(standin_dir, srv.models_dir)
    workflow_runs.write_test_inputs(os.path.join(srv.base, "input"), comfy_root)
    return srv


@pytest.fixture(scope="module")
def cluster(comfy_root, pack):
    """(master, worker): started together, the master told about the worker, both stopped at the end."""
    if not _distributed_can_queue():
        pytest.skip("ComfyUI-Distributed needs an async execution.validate_prompt(prompt_id, prompt, "
                    "partial_execution_list), which this ComfyUI does not have")
    standin_dir = standins.ensure(comfy_root)
    master, worker = _server(comfy_root, standin_dir, False), _server(comfy_root, standin_dir, True)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for started in [pool.submit(s.start) for s in (master, worker)]:
                started.result()
        for s in (master, worker):
            assert "DistributedCollector" in s.get("/object_info/DistributedCollector"), s.log()[-3000:]
        worker_entry = {"id": WORKER_ID, "name": "local worker", "host": "127.0.0.1", "port": worker.port,
                        "enabled": True, "type": "local", "cuda_device": 0, "extra_args": ""}
        status, body = master.post("/distributed/config", {"workers": [worker_entry], "worker_timeout_seconds": RUN_TIMEOUT})
        assert status == 200, body
        assert master.get("/distributed/config")["workers"][0]["port"] == worker.port
        yield master, worker
    finally:
        for s in (master, worker):
            s.stop()
            shutil.rmtree(s.base, ignore_errors=True)


# ----------------------------------------------------------------------------- prompts
def _single_save(prompt):
    """The prompt with its one saver replaced by SaveImage (PNG: lossless, compared bit for bit)."""
    prompt = copy.deepcopy(prompt)
    savers = [k for k, n in prompt.items() if n["class_type"] in SAVERS]
    assert len(savers) == 1, savers
    images = prompt.pop(savers[0])["inputs"]["images"]
    prompt[SAVE_NODE] = {"class_type": "SaveImage", "inputs": {"images": images, "filename_prefix": "xctrl/distributed"}}
    return prompt


def _seeded(prompt, seed):
    """The plain prompt: every seed input given ``seed``."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        for name in ui_format.SEED_NAMES:
            if name in node["inputs"]:
                node["inputs"][name] = seed
    return prompt


def _distributed(prompt, seed):
    """Distributed Seed feeding every seed input, Distributed Collector between the images and the save."""
    prompt = copy.deepcopy(prompt)
    seeded = 0
    for node in prompt.values():
        for name in ui_format.SEED_NAMES:
            if name in node["inputs"]:
                node["inputs"][name] = [SEED_NODE, 0]
                seeded += 1
    assert seeded, "the workflow has no seed input"
    prompt[SEED_NODE] = {"class_type": "DistributedSeed", "inputs": {"seed": seed}}
    prompt[COLLECTOR_NODE] = {"class_type": "DistributedCollector",
                              "inputs": {"images": prompt[SAVE_NODE]["inputs"]["images"], "load_balance": False}}
    prompt[SAVE_NODE]["inputs"]["images"] = [COLLECTOR_NODE, 0]
    return prompt


# ----------------------------------------------------------------------------- running
def _error(history):
    msgs = history.get("status", {}).get("messages", [])
    errs = [m[1] for m in msgs if m[0] == "execution_error"]
    return (errs[0].get("exception_message") if errs else None) or str(msgs)[:3000]


def _failed_prompts(server):
    return [_error(h) for h in server.get("/history").values() if h.get("status", {}).get("status_str") == "error"]


def _run_distributed(master, worker, prompt):
    """Queues through the master's /distributed/queue and waits for the master's history entry
    (which comes after the worker's images); a failure on the worker, which the master would only
    notice at its collector's time-out, ends the wait at once."""
    status, body = master.post("/distributed/queue", {"prompt": prompt, "client_id": "xctrl-tests",
                                                      "enabled_worker_ids": [WORKER_ID], "delegate_master": False})
    assert status == 200, f"{body}\n{master.log()[-3000:]}"
    assert body.get("worker_count") == 1, f"the worker did not get the prompt: {body}\n{master.log()[-3000:]}"
    pid = body["prompt_id"]
    deadline = time.time() + RUN_TIMEOUT
    while time.time() < deadline:
        hist = master.get(f"/history/{pid}")
        if pid in hist and hist[pid].get("status", {}).get("status_str") in ("success", "error"):
            assert hist[pid]["status"]["status_str"] == "success", f"master: {_error(hist[pid])}\n{master.log()[-3000:]}"
            return hist[pid]
        failed = _failed_prompts(worker)
        assert not failed, f"worker: {failed[0]}\n{worker.log()[-3000:]}"
        time.sleep(1)
    raise TimeoutError(f"the distributed prompt did not finish in {RUN_TIMEOUT}s\n{master.log()[-2000:]}\n{worker.log()[-2000:]}")


def _run_plain(server, prompt):
    history = server.run_prompt(prompt, timeout=RUN_TIMEOUT)
    assert history["status"]["status_str"] == "success", f"{_error(history)}\n{server.log()[-3000:]}"
    return history


def _saved(server, history):
    """The saver's images, decoded from the PNG files, in batch order."""
    import numpy as np
    from PIL import Image

    out = []
    for img in history["outputs"][SAVE_NODE]["images"]:
        with Image.open(os.path.join(server.base, "output", img.get("subfolder", ""), img["filename"])) as f:
            out.append(np.asarray(f.convert("RGB")))
    return out


def _free(*servers):
    """Unloads the previous workflow's models (two servers with SVD and SD1.5 loaded at once would
    crowd this machine's memory)."""
    for s in servers:
        try:
            s.post("/free", {"unload_models": True, "free_memory": True})
        except ValueError:  # answered with an empty body
            pass


def _check_each_participant_equals_its_seed_alone(cluster, name):
    master, worker = cluster
    _free(master, worker)
    base = _single_save(workflow_runs.api_prompt(name, master.get("/object_info"), workflow_runs.TEST_OVERRIDES))
    together = _saved(master, _run_distributed(master, worker, _distributed(base, SEED)))
    # Each seed's reference on the server that did not run that seed above.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = {seed: (srv, pool.submit(_run_plain, srv, _seeded(base, seed))) for seed, srv in ((SEED, worker), (SEED + 1, master))}
        alone = {seed: _saved(srv, run.result()) for seed, (srv, run) in runs.items()}
    n = len(alone[SEED])
    assert len(together) == 2 * n, f"the master saved {len(together)} images, not {n} of its own and {n} of the worker"
    # the seed reaches the images (else the comparison below could not tell the participants apart)
    assert any((a != b).any() for a, b in zip(alone[SEED], alone[SEED + 1])), "both seeds give the same images"
    for i in range(n):
        assert (together[i] == alone[SEED][i]).all(), f"master image {i} differs from seed {SEED} run alone"
        assert (together[n + i] == alone[SEED + 1][i]).all(), f"worker image {i} differs from seed {SEED + 1} run alone"


def test_controlnext_sd15_on_master_and_worker(cluster):
    _check_each_participant_equals_its_seed_alone(cluster, "controlnext_sd15_pose")


def test_svd_long_video_on_master_and_worker(cluster):
    """ControlNeXt-SVD v2 in the long-video windows (3 frames in windows of 2, overlap 1: the
    window loop and its fusion run), Distributed Seed feeding the sampler and the reference
    conditioning's noise augmentation."""
    _check_each_participant_equals_its_seed_alone(cluster, "controlnext_svd_v2_long_video")
