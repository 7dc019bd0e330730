"""The worker process (`python -m RadCLIPCore serve`) driven by the Slicer module's client, for real:
subprocesses, pipes, signals, and the real chest CT. No Qt and no MRML here: the client is the part
of the module that talks to the worker."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO

sys.path.insert(0, str(REPO / "RadCLIPSlicer"))

from RadCLIPSlicerLib.client import WorkerClient, default_command  # noqa: E402

PROMPTS = ["Chest CT", "Brain MRI", "A puppy"]


def rss_mb(pid) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def ct_array(chest_ct):
    image = sitk.ReadImage(str(chest_ct))
    array = sitk.GetArrayFromImage(image)[::2]  # (67, 512, 512): every second axial slice
    direction = np.reshape(image.GetDirection(), (3, 3))
    spacing = np.array(image.GetSpacing()) * [1, 1, 2]
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    matrix = np.eye(4)
    matrix[:3, :3] = lps_to_ras @ direction @ np.diag(spacing)
    matrix[:3, 3] = lps_to_ras @ np.array(image.GetOrigin())
    return np.ascontiguousarray(array), matrix


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory, tokenizer):
    """A ViT-B/16-sized CLIP (random weights): big enough that a volume takes seconds on CPU."""
    from RadCLIPCore import RadCLIPModel, save_model
    from RadCLIPCore.encoders import new_clip_model

    model = RadCLIPModel(new_clip_model("clip-vit-base-patch16", tokenizer, seed=0), tokenizer, device="cpu")
    return save_model(model, tmp_path_factory.mktemp("vitb") / "vit-b16")


@pytest.fixture
def client():
    c = WorkerClient(env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2"))
    yield c
    c.close()


def test_progress_then_result_and_a_rerank_runs_no_image_encoder(client, radclip_dir, ct_array, model):
    array, matrix = ct_array
    events = []
    rid = client.send_rank(PROMPTS, array, matrix, volume_key="ct-1", model=str(radclip_dir), max_slices=16, batch_size=4)
    final = client.wait(rid, on_event=events.append)
    assert final["event"] == "result", final
    stages = [e.get("stage") for e in events if e["event"] == "progress"]
    assert "embedding slices" in stages and events[-1] is final
    done = [e["done"] for e in events if e.get("stage") == "embedding slices"]
    assert done == sorted(done) and done[-1] == 16
    result = final["result"]
    assert result["embedded"] is True and len(result["slice_weights"]) == 67
    assert [p["text"] for p in result["prompts"]][0] in PROMPTS
    assert all(len(p["relevance"]) == 67 for p in result["prompts"])
    # the same numbers as the library on the same voxels and geometry
    from RadCLIPCore import Volume

    emb = model.embed_volume(Volume.from_ijk_to_ras(array, matrix), max_slices=16)
    expected = {r.prompt: r.probability for r in model.rank(emb, PROMPTS)}
    assert {p["text"]: pytest.approx(p["probability"], abs=1e-5) for p in result["prompts"]} == expected
    # new prompts on the same volume: the key alone travels, and no slice goes through the encoder
    events.clear()
    rid = client.send_rank(["Head CT", "A cat"], None, matrix, volume_key="ct-1", model=str(radclip_dir), max_slices=16)
    final = client.wait(rid, on_event=events.append)
    assert final["event"] == "result" and final["result"]["embedded"] is False
    assert not [e for e in events if e.get("stage") == "embedding slices"]


def test_a_bad_volume_is_an_error_event_and_the_worker_lives(client, radclip_dir, tmp_path, ct_array):
    (tmp_path / "cut.nii.gz").write_bytes(b"\x1f\x8b\x08garbage")
    rid = client.request("rank", volume=str(tmp_path / "cut.nii.gz"), prompts=PROMPTS, model=str(radclip_dir))
    final = client.wait(rid)
    assert final["event"] == "error" and "cannot read" in final["message"] and "\n" not in final["message"]
    pid = client.pid
    for bad in ({"prompts": []}, {"prompts": PROMPTS, "model": str(tmp_path / "nope")},
                {"prompts": PROMPTS, "array": {"dtype": "<i2", "shape": [2, 2], "zlib_b64": "!!"},
                 "ijk_to_ras": np.eye(4).tolist()}):
        final = client.wait(client.request("rank", **{"model": str(radclip_dir), **bad}))
        assert final["event"] == "error" and final["message"], final
    client._send({"id": 99, "op": "no-such-op"})
    client._send({"garbage": True})
    pong = client.wait(client.request("ping"))
    assert pong["event"] == "pong" and client.pid == pid  # the same process answered throughout
    assert pong["cpu_precision"] == "fp32"  # what auto means on this CPU (pinned by the suite)


def test_cancel_mid_volume_returns_within_one_batch(client, base_model_dir, ct_array):
    array, matrix = ct_array
    events = []
    rid = client.send_rank(PROMPTS, array, matrix, model=str(base_model_dir), max_slices=40, batch_size=2)
    while not any(e.get("stage") == "embedding slices" for e in events):  # the first batch is done
        events += [e for e in client.poll() if e.get("id") == rid]
        time.sleep(0.05)
    client.cancel(rid)
    sent_at = len([e for e in events if e.get("stage") == "embedding slices"])
    final = client.wait(rid, on_event=events.append)
    assert final["event"] == "cancelled"
    batches = [e for e in events if e.get("stage") == "embedding slices"]
    assert len(batches) - sent_at <= 1 and batches[-1]["done"] < 40  # at most the batch already running
    pong = client.wait(client.request("ping"))
    assert pong["event"] == "pong"  # and the worker serves the next request


def test_kill_9_mid_request_is_one_error_and_the_next_request_works(client, base_model_dir, radclip_dir, ct_array):
    array, matrix = ct_array
    rid = client.send_rank(PROMPTS, array, matrix, model=str(base_model_dir), max_slices=40, batch_size=2)
    while True:
        events = client.poll()
        if any(e.get("stage") == "embedding slices" for e in events):
            break
        time.sleep(0.05)
    first = client.pid
    os.kill(first, signal.SIGKILL)
    final = client.wait(rid)
    assert final["event"] == "error" and "stopped unexpectedly" in final["message"] and "SIGKILL" in final["message"]
    rid = client.send_rank(PROMPTS, array, matrix, model=str(radclip_dir), max_slices=8)
    final = client.wait(rid)
    assert final["event"] == "result" and client.pid != first and client.deaths == 1


def test_unload_gives_the_memory_back(client, base_model_dir, ct_array):
    array, matrix = ct_array
    idle = client.wait(client.request("ping"))
    pid = idle["pid"]
    before = rss_mb(pid)
    assert client.wait(client.send_rank(PROMPTS, array, matrix, model=str(base_model_dir), max_slices=4))["event"] == "result"
    loaded = rss_mb(pid)
    assert loaded - before > 300  # ViT-B/16 weights (~600 MB in fp32) and the volume
    assert client.wait(client.request("unload"))["event"] == "unloaded"
    after = rss_mb(pid)
    assert after - before < 0.35 * (loaded - before), (before, loaded, after)


def test_inline_transport_to_a_worker_that_cannot_see_our_files(tmp_path, radclip_dir, ct_array):
    """A remote worker shares no files: the voxels travel in the protocol. The worker here runs in
    its own mount namespace, with empty file systems over this test's folder and over the client's
    temporary folder, so nothing the client writes is visible to it."""
    probe = subprocess.run(["unshare", "--mount", "--map-root-user", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare is not permitted here: {probe.stderr.decode().strip()[:120]}")
    model_copy = REPO / ".pytest-worker-model"  # outside the hidden folders: the worker must see the model
    subprocess.run(["rm", "-rf", str(model_copy)], check=True)
    subprocess.run(["cp", "-r", str(radclip_dir), str(model_copy)], check=True)
    secret = tmp_path / "visible-only-to-the-client.txt"
    secret.write_text("x")
    c = WorkerClient(transport="inline", env=dict(os.environ, HF_HUB_OFFLINE="1"))
    hidden = [str(tmp_path), c._tmp.name]
    c.command = ["unshare", "--mount", "--map-root-user", "sh", "-c",
                 " && ".join([f"mount -t tmpfs none {d}" for d in hidden] + ["cd /", f"test ! -e {secret}",
                                                                           "exec " + " ".join(default_command())])]
    try:
        array, matrix = ct_array
        final = c.wait(c.send_rank(PROMPTS, array, matrix, volume_key="remote", model=str(model_copy), max_slices=8))
        assert final["event"] == "result", (final, c.log_path.read_text())
        assert len(final["result"]["slice_weights"]) == 67
        assert not list(Path(c._tmp.name).glob("*.npy"))  # nothing went through files
        final = c.wait(c.request("rank", volume=str(secret), prompts=PROMPTS, model=str(model_copy)))
        assert final["event"] == "error" and "not found" in final["message"]  # it truly cannot see our files
        final = c.wait(c.send_rank(["Head CT"], None, matrix, volume_key="remote", model=str(model_copy), max_slices=8))
        assert final["event"] == "result" and final["result"]["embedded"] is False
    finally:
        c.close()
        subprocess.run(["rm", "-rf", str(model_copy)])


def test_label_maps_are_deleted_when_their_request_ends(client, radclip_dir, ct_array):
    """Each segmentation request writes its label map for the worker; none may stay behind (tens to
    hundreds of MB per click on a real CT). The volume's own file is kept once, for the next request."""
    array, matrix = ct_array
    labels = np.zeros(array.shape, np.uint8)
    labels[20:40, 200:300, 150:350] = 1
    for prompts in (PROMPTS, ["Head CT", "A cat"], ["Brain MRI"]):
        final = client.wait(client.send_rank(prompts, array, matrix, volume_key="ct-seg", labelmap=labels,
                                             segments={1: "box"}, model=str(radclip_dir), max_slices=8))
        assert final["event"] == "result" and final["result"]["segments"][0]["segment"] == "box", final
    files = sorted(p.name for p in Path(client._tmp.name).glob("*.npy"))
    assert len(files) == 1, files  # the volume's file only


def test_the_panel_and_a_script_never_take_each_others_events(client, radclip_dir, ct_array):
    array, matrix = ct_array
    a = client.send_rank(PROMPTS, array, matrix, volume_key="ct-a", model=str(radclip_dir), max_slices=8)
    b = client.send_rank(["Head CT"], array, matrix, volume_key="ct-a", model=str(radclip_dir), max_slices=8)
    final_b = client.wait(b)  # a script waits for its own request while the panel's runs
    assert final_b["event"] == "result" and final_b["id"] == b
    events = []
    while not any(e.get("event") in ("result", "error") for e in events):
        events += client.poll([a])  # the panel polls for its own
        time.sleep(0.05)
    assert {e["id"] for e in events} == {a} and events[-1]["event"] == "result"


@pytest.fixture
def hanging_hub():
    """An HTTP endpoint that accepts connections and never answers: a model download that hangs."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for s in held:
        s.close()


def _loading(c, rid):
    """Poll until request `rid` reports that the worker loads its model."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(e.get("stage") == "loading model" for e in c.poll([rid])):
            return
        time.sleep(0.05)
    raise AssertionError("the worker never started loading the model")


def test_cancel_while_the_model_downloads_kills_the_worker_at_once(tmp_path, hanging_hub, radclip_dir, ct_array):
    """A download (or a load) cannot be interrupted inside the worker: the client kills it, the
    request ends `cancelled` (not an error), and the next request starts a fresh worker."""
    env = dict(os.environ, HF_ENDPOINT=hanging_hub, HF_HOME=str(tmp_path / "hf"), HF_HUB_ETAG_TIMEOUT="600",
               HF_HUB_DOWNLOAD_TIMEOUT="600")
    env.pop("HF_HUB_OFFLINE", None)
    c = WorkerClient(env=env)
    try:
        array, matrix = ct_array
        rid = c.send_rank(PROMPTS, array, matrix, model="someone/some-clip", max_slices=4)
        _loading(c, rid)
        time.sleep(1.0)  # inside the download now
        first = c.pid
        c.cancel(rid)
        final = c.wait(rid, timeout=30)
        assert final["event"] == "cancelled", final
        assert c.deaths == 0
        with pytest.raises(ProcessLookupError):
            os.kill(first, 0)
        final = c.wait(c.send_rank(PROMPTS, array, matrix, model=str(radclip_dir), max_slices=4))
        assert final["event"] == "result" and c.pid != first
    finally:
        c.close()


def test_stopping_a_worker_that_loads_a_model_never_waits_for_it(tmp_path, hanging_hub, ct_array):
    """Reload, exit or a new worker command stop the worker from Slicer's GUI thread: stop() returns
    while the worker is still busy (it cannot answer `shutdown` while it downloads), pending requests
    end `cancelled` at once, and the worker is killed shortly after."""
    env = dict(os.environ, HF_ENDPOINT=hanging_hub, HF_HOME=str(tmp_path / "hf"), HF_HUB_ETAG_TIMEOUT="600",
               HF_HUB_DOWNLOAD_TIMEOUT="600")
    env.pop("HF_HUB_OFFLINE", None)
    c = WorkerClient(env=env)
    array, matrix = ct_array
    rid = c.send_rank(PROMPTS, array, matrix, model="someone/some-clip", max_slices=4)
    _loading(c, rid)
    process = c._process
    c.stop(timeout=3.0)
    assert process.poll() is None  # stop() did not wait for the worker
    assert [e["event"] for e in c.poll([rid])] == ["cancelled"]
    assert process.wait(timeout=30) is not None  # killed by the reaper (it never answered shutdown)
    c.close()


def _fifo(folder):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "voxels.npy"
    os.mkfifo(path)
    return str(path)


def test_bad_requests_get_one_error_each_and_never_kill_hang_or_wedge_the_worker(client, radclip_dir, tmp_path):
    """Each request is checked when it arrives: ids, types and bounds of every field, voxel files
    that are not regular files (a FIFO would block the reader for ever), inline voxels that inflate
    past their declared size (a decompression bomb)."""
    import base64
    import zlib

    pid = client.wait(client.request("ping"))["pid"]
    bomb = base64.b64encode(zlib.compress(b"\0" * (64 << 20))).decode()
    eye = np.eye(4).tolist()
    bad = [
        {"prompts": "Chest CT"}, {"prompts": [1, 2]}, {"prompts": ["x" * 100_000]},
        {"prompts": ["a"] * 5000}, {"prompts": PROMPTS, "max_slices": -1}, {"prompts": PROMPTS, "max_slices": True},
        {"prompts": PROMPTS, "batch_size": 0}, {"prompts": PROMPTS, "plane": "oblique"},
        {"prompts": PROMPTS, "no_such_field": 1}, {"prompts": PROMPTS, "ijk_to_ras": [[1, 2], [3]]},
        {"prompts": PROMPTS, "array": {"npy": _fifo(tmp_path)}, "ijk_to_ras": eye},
        {"prompts": PROMPTS, "array": {"dtype": "<i2", "shape": [2, 2, 2], "zlib_b64": bomb}, "ijk_to_ras": eye},
        {"prompts": PROMPTS, "array": {"dtype": "|O", "shape": [2], "zlib_b64": ""}, "ijk_to_ras": eye},
        {"prompts": PROMPTS, "array": {"dtype": "<f4", "shape": [100000, 100000, 100000], "zlib_b64": ""},
         "ijk_to_ras": eye},
        {"prompts": PROMPTS, "segments": {"one": "liver"}},
    ]
    for fields in bad:
        final = client.wait(client.request("rank", **{"model": str(radclip_dir), **fields}), timeout=60)
        assert final["event"] == "error" and "\n" not in final["message"], (fields.keys(), final)
    for line in ('{"id": NaN, "op": "rank"}', '{"id": [1], "op": "ping"}', '{"id": {"a": 1}, "op": "rank"}',
                 '{"id": 1.5, "op": "ping"}', '[1, 2]', '{"op": "rank", "id": 7, "prompts": {"a": 1}}'):
        client._process.stdin.write(line.encode() + b"\n")
        client._process.stdin.flush()
    pong = client.wait(client.request("ping"), timeout=60)
    assert pong["event"] == "pong" and pong["pid"] == pid  # the same process, still serving
    for volume in (_fifo(tmp_path / "v"), str(tmp_path)):  # a FIFO and a folder as the volume
        final = client.wait(client.request("rank", prompts=PROMPTS, model=str(radclip_dir), volume=volume), timeout=60)
        assert final["event"] == "error" and "\n" not in final["message"], final


def test_a_worker_killed_before_the_next_request_still_ends_its_own(client, base_model_dir, radclip_dir, ct_array):
    """The next request is sent (starting a fresh worker) before the dead worker's exit was read: the
    request the dead worker held still ends with one error, and the new one with its result."""
    array, matrix = ct_array
    rid = client.send_rank(PROMPTS, array, matrix, model=str(base_model_dir), max_slices=40, batch_size=2)
    _wait_for_stage(client, rid, "embedding slices")
    first = client.pid
    os.kill(first, signal.SIGKILL)
    client._process.wait()
    second = client.send_rank(PROMPTS, array, matrix, model=str(radclip_dir), max_slices=4)
    assert client.wait(rid, timeout=60)["event"] == "error"
    final = client.wait(second, timeout=300)
    assert final["event"] == "result" and client.pid != first


def test_two_volumes_queued_back_to_back_both_read_their_voxels(client, radclip_dir, ct_array):
    """The second volume's file must not delete the first one's before the worker has read it."""
    array, matrix = ct_array
    a = client.send_rank(PROMPTS, array, matrix, volume_key="vol-a", model=str(radclip_dir), max_slices=4)
    b = client.send_rank(PROMPTS, array[:, ::2, ::2].copy(), matrix, volume_key="vol-b", model=str(radclip_dir),
                         max_slices=4)
    assert client.wait(a)["event"] == "result" and client.wait(b)["event"] == "result"
    assert len(list(Path(client._tmp.name).glob("*.npy"))) == 1  # the older file went once both had read


def test_lines_before_the_protocol_are_skipped(radclip_dir, ct_array):
    """An ssh login banner, a bare number or `null` before the first protocol line."""
    c = WorkerClient(["sh", "-c", "echo 42; echo null; echo 'Welcome to gpu-box'; exec \"$0\" -m RadCLIPCore serve",
                      sys.executable], env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        array, matrix = ct_array
        assert c.wait(c.send_rank(PROMPTS, array, matrix, model=str(radclip_dir), max_slices=4))["event"] == "result"
    finally:
        c.close()


def test_a_stale_cancel_never_cancels_a_later_request_with_the_same_id(client, radclip_dir, ct_array):
    array, matrix = ct_array
    path = Path(client._tmp.name) / "stale.npy"
    np.save(path, array[:8])
    line = json.dumps({"id": "dup", "op": "rank", "prompts": PROMPTS, "model": str(radclip_dir), "max_slices": 4,
                       "array": {"npy": str(path)}, "ijk_to_ras": matrix.tolist()})
    client.start()
    for text in (line, json.dumps({"id": "dup", "op": "cancel"}), line):
        client._process.stdin.write(text.encode() + b"\n")
        client._process.stdin.flush()
        if text is line:
            assert client.wait("dup", timeout=300)["event"] == "result"


def _wait_for_stage(c, rid, stage):
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if any(e.get("stage") == stage for e in c.poll([rid])):
            return
        time.sleep(0.05)
    raise AssertionError(f"request {rid} never reached '{stage}'")


def test_a_provisional_ranking_comes_before_the_result_and_the_result_is_a_one_shot_run(client, radclip_dir,
                                                                                        ct_array, model):
    """67 slices: 16 evenly spaced ones first, their ranking sent as `provisional`, then the final
    result: the same record as the library's one-shot run on the same voxels."""
    from RadCLIPCore import Volume

    array, matrix = ct_array
    events = []
    rid = client.send_rank(PROMPTS, array, matrix, volume_key="ct-prov", model=str(radclip_dir), batch_size=4)
    final = client.wait(rid, on_event=events.append)
    assert final["event"] == "result", final
    kinds = [e["event"] for e in events]
    assert kinds.count("provisional") == 1 and kinds.index("provisional") < kinds.index("result")
    early = events[kinds.index("provisional")]
    assert (early["slices"], early["total"]) == (16, 67)
    assert all(len(p["relevance"]) == 67 for p in early["result"]["prompts"])
    assert "segments" not in early["result"]
    result = final["result"]
    assert result["precision"] == early["result"]["precision"] == "fp32"  # auto, pinned by the suite
    model.clear_cache()
    one_shot = model.ranking_record(model.embed_volume(Volume.from_ijk_to_ras(array, matrix), batch_size=4), PROMPTS)
    result.pop("embedded")
    assert json.dumps(result, sort_keys=True) == json.dumps(one_shot, sort_keys=True)
    # from the worker's cache: the answer at once, nothing provisional
    events.clear()
    final = client.wait(client.send_rank(["A cat"], None, matrix, volume_key="ct-prov", model=str(radclip_dir),
                                         batch_size=4), on_event=events.append)
    assert final["result"]["embedded"] is False and not [e for e in events if e["event"] == "provisional"]
