"""Stage 1 at scale: rows checked from their headers and read when drawn (by data-loader workers),
preprocessed shards (pack-shards), --max-steps and the run's speed and memory in summary.json,
bit-exact resume with workers and with shards, and each DDP rank reading only its share.

Data: the demo's real slices (MNI152 brain, chest CT; Training/demo_data.py) and a tiny random CLIP.
"""
import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from conftest import REPO

from RadCLIPCore import PreprocessConfig, RadCLIPError, RadCLIPModel, save_model
from RadCLIPCore.datasets import ImageTextDataset, VolumeLRU, row_unit
from RadCLIPCore.encoders import bundled_tokenizer, new_clip_model
from RadCLIPCore.manifests import read_manifest, write_manifest
from RadCLIPCore.preprocessing import clip_processor_config, prepare_image, prepare_volume, slice_unit
from RadCLIPCore.shards import ShardSampler
from RadCLIPCore.volume_io import read_image_info, read_volume

from test_training import _KILL_AFTER_STEP, STAGE1, _weights, run, run_code, stage1_args

CONFIG = clip_processor_config(64)  # clip-tiny's (a CLIP model without recorded preprocessing: CLIP's processor)


def pack(manifest, out, *extra):
    return subprocess.run(
        [sys.executable, "-m", "RadCLIPCore", "pack-shards", str(manifest), str(out), "--init-config", "clip-tiny",
         "--no-progress", *map(str, extra)], capture_output=True, text=True, timeout=600, cwd=REPO,
        env=dict(os.environ, PYTHONPATH="", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def train_only(demo, tmp_path_factory):
    """17 training rows of two texts (odd: DistributedSampler pads one rank), no validation."""
    out, slices, _ = demo
    rows = [dict(r, split="train", image=str(out / r["image"])) for r in csv.DictReader(open(slices))
            if r["split"] == "train"]
    rows = [r for r in rows if r["text"] == "Brain MRI"][:9] + [r for r in rows if r["text"] == "Chest CT"][:8]
    assert len(rows) == 17 and len({r["text"] for r in rows}) == 2
    path = out / "train17.csv"
    write_manifest(path, rows)
    return path


@pytest.fixture(scope="module")
def shards(demo, tmp_path_factory):
    """The demo's slices packed in shards of 8 rows, with one unreadable PNG among them."""
    out, slices, _ = demo
    work = tmp_path_factory.mktemp("shards")
    rows = [dict(r, image=str(out / r["image"])) for r in csv.DictReader(open(slices))]
    (work / "junk.png").write_bytes(b"not a png")
    rows.append(dict(rows[0], image=str(work / "junk.png"), split="train"))
    manifest = work / "m.csv"
    write_manifest(manifest, rows)
    res = pack(manifest, work / "packed", "--shard-size", 8)
    assert res.returncode == 0, res.stderr
    return manifest, work / "packed", res


# ------------------------------------------------------------------- lazy rows
def test_rows_are_checked_from_headers_and_read_only_when_drawn(demo, tmp_path):
    out, _, volumes = demo
    png = sorted((out / "slices").glob("*.png"))[0]
    broken = tmp_path / "broken.png"  # a sound header, then half of the pixel data
    data = png.read_bytes()
    broken.write_bytes(data[:len(data) // 2])
    assert read_image_info(broken).shape == read_volume(png).array.shape
    vol = sorted((out / "volumes").glob("mni152_*.nii.gz"))[0]
    rows = [{"image": str(png), "text": "Brain MRI"}, {"image": str(broken), "text": "Brain MRI"},
            {"image": str(vol), "text": "Brain MRI"},  # a volume where a 2D image belongs
            {"image": str(vol), "text": "Brain MRI", "slice": 99, "plane": "axial"}]
    write_manifest(tmp_path / "m.csv", rows)
    manifest = read_manifest(tmp_path / "m.csv")
    ds = ImageTextDataset(manifest.samples, {"Brain MRI": 0}, CONFIG, manifest)
    assert len(ds) == 2 and sorted(r for r, _ in manifest.bad) == [4, 5]
    assert "expected a 2D image" in manifest.report() and "outside the volume" in manifest.report()
    pixels, text_id = ds[0]
    expected = prepare_image(read_volume(png), CONFIG, unit=True).half().float()
    assert pixels.shape == (3, 64, 64) and text_id == 0
    assert torch.allclose(pixels[0] * CONFIG.std[0] + CONFIG.mean[0], expected[0, 0], atol=1e-6)
    with pytest.raises(RadCLIPError, match=r"manifest line 3 \(.*broken.png\) passed the check before training "
                                           r"but cannot be read now: .*--resume"):
        ds[1]


def test_a_volume_is_read_once_for_its_listed_slices(demo):
    out, _, _ = demo
    vol = sorted((out / "volumes").glob("chest_ct_*.nii.gz"))[0]
    manifest = read_manifest(_slices_manifest(out, vol))
    volumes = VolumeLRU(2)
    units = [row_unit(s, CONFIG, volumes) for s in manifest.samples]
    assert volumes.reads == 1 and len(units) == 10
    prepared = prepare_volume(read_volume(vol), "axial", None, CONFIG)
    for s, unit in zip(manifest.samples, units):  # the same pixels as preparing the volume for each slice
        assert unit.shape == (1, 64, 64) and torch.equal(unit, slice_unit(prepared, s.slice)[0])


def _slices_manifest(out, vol):
    path = out / f"slices_of_{vol.name}.jsonl"
    path.write_text("".join(json.dumps({"image": str(vol), "text": "Chest CT", "slice": i, "plane": "axial"}) + "\n"
                            for i in range(0, 20, 2)))
    return path


def test_a_row_that_breaks_after_the_check_stops_the_run_with_one_line(train_only, tmp_path):
    rows = list(csv.DictReader(open(train_only)))
    png = rows[3]["image"]
    data = open(png, "rb").read()
    (tmp_path / "broken.png").write_bytes(data[:len(data) // 2])
    rows[3]["image"] = str(tmp_path / "broken.png")
    write_manifest(tmp_path / "m.csv", rows)
    res = run(STAGE1, *stage1_args(tmp_path / "m.csv", tmp_path / "run", "--epochs", 1, "--batch-size", 4,
                                   "--workers", 1))
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: manifest line 5 (")
    assert "broken.png) passed the check before training but cannot be read now" in res.stderr


# ------------------------------------------------------------------- shards
def test_pack_shards_writes_readable_tars_records_preprocessing_and_reports_bad_rows(shards):
    manifest, packed, res = shards
    warning = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "1 bad manifest row(s) skipped in m.csv" in warning[0] and "cannot read" in warning[0]
    assert "1 bad (skipped)" in res.stdout and res.stdout.splitlines()[1].startswith("manifest rows: ")
    assert res.stdout.splitlines()[0] == "preprocessing: minmax-8bit, CLIP crop 64 px from a shortest edge of 64"
    index = json.loads((packed / "index.json").read_text())
    assert index["preprocessing"] == CONFIG.to_dict() and index["rows"]["bad"] == 1
    parsed = read_manifest(manifest)
    by_row = {s.row: s for s in parsed.samples}
    packed_rows = 0
    for shard in index["shards"]:
        with tarfile.open(packed / shard["file"]) as tar:  # plain tar, WebDataset layout: key.npy/.txt/.json
            names = tar.getnames()
            assert names[:3] == [f"{shard['keys'][0]}.{ext}" for ext in ("npy", "txt", "json")]
            key = shard["keys"][0]
            unit = np.load(io.BytesIO(tar.extractfile(f"{key}.npy").read()))
            meta = json.loads(tar.extractfile(f"{key}.json").read())
            sample = by_row[meta["row"]]
            assert tar.extractfile(f"{key}.txt").read().decode() == sample.text
            assert unit.dtype == np.float16 and unit.shape == (1, 64, 64)
            assert np.array_equal(unit, row_unit(sample, CONFIG, VolumeLRU()).half().numpy())
        packed_rows += len(shard["keys"])
    assert packed_rows == index["rows"]["train"] + index["rows"]["val"]
    stamps = {p.name: p.stat().st_mtime_ns for p in packed.glob("*.tar")}
    res = pack(manifest, packed, "--shard-size", 8)  # packing again: every shard is complete and kept
    assert res.returncode == 0, res.stderr
    assert {p.name: p.stat().st_mtime_ns for p in packed.glob("*.tar")} == stamps
    assert json.loads((packed / "index.json").read_text())["shards"] == index["shards"]


def test_stage1_trains_from_shards_for_max_steps_and_reports_its_speed(shards, tmp_path):
    _, packed, _ = shards
    res = run(STAGE1, *stage1_args(packed, tmp_path / "run", "--epochs", 5, "--max-steps", 3, "--batch-size", 4,
                                   "--workers", 2))
    assert res.returncode == 0, res.stderr
    index = json.loads((packed / "index.json").read_text())
    assert index["rows_line"] in res.stdout.splitlines()  # where the rows went, as packing said
    steps = [json.loads(x) for x in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3] and steps[-1]["lr"] == 0.0  # the schedule ends at the last step
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["reached_max_steps"] and summary["steps"] == 3 and summary["input"] == "shards"
    assert summary["time_to_first_step_s"] > 0 and summary["samples_per_second"] > 0 and summary["workers"] == 2
    assert summary["peak_rss_mb"] > 100 and summary["peak_rss_worker_mb"] > 0 and summary["peak_cuda_mb"] is None


def test_shards_of_other_preprocessing_are_refused_in_one_line(shards, tmp_path):
    _, packed, _ = shards
    tok = bundled_tokenizer()
    other = save_model(RadCLIPModel(new_clip_model("clip-tiny", tok, seed=0), tok,
                                    preprocess=PreprocessConfig(image_size=64, zscore_clip=2.5)), tmp_path / "other")
    args = stage1_args(packed, tmp_path / "run", "--epochs", 1)
    args[args.index("--init-config"):args.index("--init-config") + 2] = ["--model", other]
    res = run(STAGE1, *args)
    assert res.returncode == 2
    assert res.stderr.strip() == (f"error: the shards in {packed} were packed with preprocessing zscore_clip 3.0, "
                                  f"the model's is 2.5: pack them again with this --model (pack-shards), or train "
                                  f"the model they were packed for")
    res = run(REPO / "Training" / "pretrain_adapter.py", "--train-manifest", packed, "--output", tmp_path / "s2",
              "--init-config", "clip-tiny", "--no-progress")
    assert res.returncode == 2 and "only stage 1 (pretrain-2d) reads" in res.stderr


def test_shard_sampler_gives_each_rank_its_own_contiguous_share():
    class Packed:
        shard_bounds = [(0, 8), (8, 16), (16, 24), (24, 29)]  # 29 samples in 4 shards

        def __len__(self):
            return 29

    def draws(epoch, world=2, seed=0):
        out = []
        for rank in range(world):
            sampler = ShardSampler(Packed(), num_replicas=world, rank=rank, seed=seed, mix=2)
            sampler.set_epoch(epoch)
            out.append(list(sampler))
        return out

    a, b = draws(0)
    assert len(a) == len(b) == 15 and sorted(set(a) | set(b)) == list(range(29))  # each once, one repeat (padding)
    assert len(a + b) - len(set(a + b)) == 1
    shard = [next(k for k, (lo, hi) in enumerate(Packed.shard_bounds) if lo <= i < hi) for i in a]
    assert len(set(shard[:8])) <= 2  # a rank reads `mix` shards at a time
    assert draws(0) == [a, b] and draws(1) != [a, b] and draws(0, seed=1) != [a, b]  # only (seed, epoch)


# ------------------------------------------------------------------- resume, DDP
@pytest.mark.parametrize("source", ["manifest, 2 workers", "shards"])
def test_killed_mid_epoch_and_resumed_ends_at_the_same_weights_when_streaming(demo, shards, source, tmp_path):
    data = shards[1] if source == "shards" else demo[1]
    args = stage1_args(data, None, "--epochs", 3, "--batch-size", 4, "--lr", 1e-3, "--workers", 2)
    straight = tmp_path / "straight"
    res = run(STAGE1, *[straight if a is None else a for a in args])
    assert res.returncode == 0, res.stderr
    spe = len([1 for line in (straight / "steps.jsonl").read_text().splitlines() if json.loads(line)["epoch"] == 0])
    killed = tmp_path / "killed"
    code = _KILL_AFTER_STEP.format(repo=str(REPO), script=str(STAGE1), step=spe + 2)
    res = run_code(code, *[killed if a is None else a for a in args])
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert len((killed / "steps.jsonl").read_text().splitlines()) == spe + 2 < 2 * spe  # mid-epoch
    res = run(STAGE1, *[killed if a is None else a for a in args], "--resume")
    assert res.returncode == 0, res.stderr
    a, b = _weights(straight), _weights(killed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("source", ["manifest", "shards"])
def test_two_ddp_processes_each_read_their_own_share_of_the_rows(train_only, source, tmp_path):
    data = train_only
    if source == "shards":
        res = pack(train_only, tmp_path / "packed", "--shard-size", 4)
        assert res.returncode == 0, res.stderr
        data = tmp_path / "packed"
    trace = tmp_path / "trace"
    trace.mkdir()
    env = dict(os.environ, PYTHONPATH="", OMP_NUM_THREADS="1", RADCLIP_TRACE_ROWS=str(trace))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(STAGE1), *map(str, stage1_args(data, tmp_path / "run", "--epochs", 1, "--batch-size", 4,
                                                             "--workers", 1))],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = {rank: [int(x) for f in trace.glob(f"rank{rank}-*.txt") for x in f.read_text().split()] for rank in (0, 1)}
    assert len(seen[0]) == len(seen[1]) == 9  # 17 rows over 2 ranks: 9 each, one row drawn twice (padding)
    expected = sorted(s.row for s in read_manifest(train_only).samples)
    assert sorted(set(seen[0]) | set(seen[1])) == expected
    assert len(set(seen[0]) & set(seen[1])) <= 1
    assert {f.name.split("-")[0] for f in trace.iterdir()} == {"rank0", "rank1"}


@pytest.mark.parametrize("case", ["parent path", "absolute path", "foreign shard", "fewer texts than ids",
                                  "short offset table", "missing keys", "negative offset", "empty tar",
                                  "a folder as shard"])
def test_a_shard_index_never_reaches_outside_its_pack_and_damage_is_one_line(shards, tmp_path, case):
    """Every entry is checked when the index opens: shard names are plain names in the index's folder,
    each shard is the one it was packed with (size and fingerprint), the columns are whole."""
    import shutil

    from RadCLIPCore import RadCLIPError
    from RadCLIPCore.shards import ShardIndex

    _, packed, _ = shards
    copy = tmp_path / "pack"
    shutil.copytree(packed, copy)
    index = json.loads((copy / "index.json").read_text())
    first = index["shards"][0]
    if case == "parent path":
        first["file"] = "../other/train-00000.tar"
    elif case == "absolute path":
        first["file"] = "/etc/passwd"
    elif case == "foreign shard":  # another pack's shard of the same name: here, the next shard's bytes
        shutil.copy(copy / index["shards"][1]["file"], copy / first["file"])
    elif case == "fewer texts than ids":
        index["texts"] = index["texts"][:1]
    elif case == "short offset table":
        first["offsets"] = first["offsets"][:-1]
    elif case == "missing keys":
        del first["keys"]
    elif case == "negative offset":
        first["offsets"][0] = -512
    elif case == "empty tar":
        (copy / first["file"]).write_bytes(b"")
    elif case == "a folder as shard":
        (copy / first["file"]).unlink()
        (copy / first["file"]).mkdir()
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(RadCLIPError) as err:
        ShardIndex.open(copy)
    message = str(err.value)
    assert "\n" not in message and "shard" in message, message
    if case in ("parent path", "absolute path"):
        assert "never a path" in message
    if case == "foreign shard":
        assert "not the shard this index was packed with" in message
    res = run(STAGE1, *stage1_args(copy, tmp_path / "run", "--epochs", 1))  # the CLI: one line, exit 2
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
