"""One preprocessing contract (issue 12): CLIP processor parity, the intensity policies, export of
slices as the model sees them, the 8-bit display-image rule, and one recorded policy read by every
path (library, CLI, evaluation, training, worker, Slicer)."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from conftest import REPO, tiny_clip

from RadCLIPCore import RadCLIPError, RadCLIPModel, load_model, read_volume, save_model
from RadCLIPCore.encoders import image_features
from RadCLIPCore.intensity import CT_WINDOWS, volume_stats
from RadCLIPCore.loading import model_preprocessing
from RadCLIPCore.manifests import Manifest, read_manifest
from RadCLIPCore.preprocessing import (ConfigError, PreprocessConfig, clip_processor_config, prepare_image,
                                       prepare_slice, prepare_volume, row_image_unit, slices_to_unit, with_policy)
from RadCLIPCore.slice_export import export_slices

ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "RadCLIPCore", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=REPO)


@pytest.fixture(scope="module")
def mni_png(tmp_path_factory, mni):
    """An 8-bit PNG of a real MNI152 coronal slice (not square: 189 x 197)."""
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(mni)))[:, 110, :].astype(np.float32)
    png = np.round(255 * arr / arr.max()).astype(np.uint8)
    path = tmp_path_factory.mktemp("png") / "mni_coronal.png"
    sitk.WriteImage(sitk.GetImageFromArray(png), str(path))
    return path, png


@pytest.fixture(scope="module")
def hf_with_processor(tmp_path_factory, tokenizer):
    """A Hugging Face CLIP folder with a non-default preprocessor_config.json."""
    from transformers import CLIPImageProcessorPil

    path = tmp_path_factory.mktemp("hfp") / "clip-with-processor"
    tiny_clip(tokenizer).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    CLIPImageProcessorPil(size={"shortest_edge": 80}, crop_size={"height": 64, "width": 64}, resample=2,
                          image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]).save_pretrained(str(path))
    return path


# --------------------------------------------------------------------------- published weights
def test_our_pixels_equal_clip_image_processor_and_embed_image_equals_the_tower(hf_with_processor, mni_png):
    from transformers import CLIPImageProcessorPil

    path, png = mni_png
    model = load_model(hf_with_processor, device="cpu")
    cfg = model.preprocess
    assert (cfg.intensity, cfg.geometry, cfg.resize, cfg.resample, cfg.mean) == (
        "minmax-8bit", "crop", 80, 2, (0.5, 0.4, 0.3))
    processor = CLIPImageProcessorPil.from_pretrained(str(hf_with_processor))
    theirs = processor(images=[np.repeat(png[..., None], 3, -1)], return_tensors="pt")["pixel_values"]
    ours = prepare_image(read_volume(path), cfg)
    assert ours.shape == theirs.shape == (1, 3, 64, 64)
    assert float((ours - theirs).abs().max()) < 1e-3
    with torch.no_grad():
        tower = F.normalize(image_features(model.clip, theirs), dim=-1)[0].numpy()
    np.testing.assert_allclose(model.embed_image(path), tower, atol=1e-5)


def test_a_clip_folder_without_processor_config_gets_clip_defaults(hf_dir, pth_file):
    for source in (hf_dir, pth_file):
        cfg = load_model(source, device="cpu", config="clip-tiny").preprocess
        assert cfg == clip_processor_config(64) == model_preprocessing(source, config="clip-tiny")
        assert (cfg.intensity, cfg.geometry, cfg.resize, cfg.resample) == ("minmax-8bit", "crop", 64, 3)


def test_old_model_folders_load_with_the_policy_they_were_trained_with(radclip_dir, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(radclip_dir, old)
    meta = json.loads((old / "radclip_config.json").read_text())
    meta["preprocessing"] = {k: meta["preprocessing"][k] for k in ("image_size", "mean", "std", "zscore_clip")}
    (old / "radclip_config.json").write_text(json.dumps(meta))
    cfg = load_model(old, device="cpu").preprocess
    assert (cfg.intensity, cfg.geometry) == ("zscore-volume", "letterbox")
    assert model_preprocessing(old) == cfg


def test_unusable_processor_configs_and_policies_are_named(hf_with_processor, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(hf_with_processor, bad)
    data = json.loads((bad / "preprocessor_config.json").read_text())
    (bad / "preprocessor_config.json").write_text(json.dumps(dict(data, crop_size={"height": 32, "width": 32})))
    with pytest.raises(RadCLIPError, match="centre crop of the vision tower's 64 px"):
        load_model(bad, device="cpu")
    for bad_settings, key in (({"intensity": "hu"}, "intensity"), ({"intensity": "ct-window", "windows": ["liver"]},
                              "windows"), ({"intensity": "ct-window", "windows": ["lung", "bone"]}, "windows"),
                              ({"percentiles": [99, 1]}, "percentiles"), ({"windows": ["lung"]}, "windows"),
                              ({"geometry": "stretch"}, "geometry"), ({"resize": 300}, "resize")):
        with pytest.raises(ConfigError, match=f"'preprocessing.{key}'"):
            PreprocessConfig(**bad_settings)
    res = cli("export-slices", hf_with_processor, tmp_path / "out", "--intensity", "ct-window", "--windows",
              "lung,liver", "--model", hf_with_processor)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: '--windows' must be 1 or 3 windows, got [\"lung\", \"liver\"]"]


# --------------------------------------------------------------------------- the policies
def test_ct_windows_are_fixed_hounsfield_units_in_every_scan(chest_ct):
    cfg = PreprocessConfig(image_size=32, intensity="ct-window", windows=("lung", (-600.0, 1500.0), "bone"))
    level, width = CT_WINDOWS["bone"]
    values = np.array([[-1350.0, -600.0, 150.0, level, level + width / 2 + 10]], np.float32)
    for gain in (1.0, 3.0):  # the rest of the scan changes; a voxel's HU maps to the same value
        scan = np.concatenate([values, np.full((1, 5), gain * 500, np.float32)], 1)[None]
        unit = slices_to_unit(scan, volume_stats(scan, cfg), (1.0, 1.0), cfg)
        assert unit.shape == (1, 3, 32, 32)
    from RadCLIPCore.intensity import to_unit

    unit = to_unit(torch.from_numpy(values[None]), volume_stats(values[None], cfg), cfg)[0]
    np.testing.assert_allclose(unit[0, 0], [0, 0.5, 1, 1, 1], atol=1e-6)  # lung window -1350..150
    np.testing.assert_allclose(unit[0], unit[1])  # the same window by name or by [level, width]
    np.testing.assert_allclose(unit[2, 0, 3:], [0.5, 1.0], atol=1e-6)
    vol = read_volume(chest_ct)
    both = prepare_volume(vol, config=cfg)
    assert both.stats.is_ct and both.config.channels == 3
    batch = next(both.unit_batches(4))
    assert not torch.allclose(batch[:, 0], batch[:, 2])  # lung and bone windows differ


def test_percentile_zscore_and_minmax_policies(mni, chest_ct):
    vol = read_volume(mni)
    vol.array = vol.array.astype(np.float32)
    hot = vol.array.copy()
    hot[0, 0, 0] = hot.max() * 1000  # one wild voxel
    for policy in ("percentile", "zscore-slice"):
        cfg = PreprocessConfig(image_size=48, intensity=policy)
        a = next(prepare_volume(vol, "axial", 5, cfg).unit_batches(5))
        b = next(prepare_volume(read_volume(mni).__class__(hot, vol.spacing, vol.direction, vol.origin), "axial", 5,
                                cfg).unit_batches(5))
        assert float((a[1:] - b[1:]).abs().max()) < 0.01  # slices without the wild voxel are unchanged
    # z-score per slice: a slice is treated as the 2D image it would be on its own
    cfg = PreprocessConfig(image_size=48, intensity="zscore-slice")
    prepared = prepare_volume(vol, "axial", None, cfg)
    one = prepared.slices([90])[0].astype(np.float32)
    alone = prepare_image(vol.__class__(one[None], (1.0, 1.0, 1.0)), cfg, unit=True)
    torch.testing.assert_close(slices_to_unit(one[None], prepared.stats, prepared.pixel_spacing, cfg), alone)
    cfg = PreprocessConfig(image_size=48, intensity="minmax-8bit", geometry="crop")
    unit = next(prepare_volume(vol, "axial", 4, cfg).unit_batches(4))
    np.testing.assert_allclose(unit * 255, torch.round(unit * 255), atol=1e-4)  # 8-bit levels
    mixed = PreprocessConfig(image_size=48, intensity="ct-window-or-percentile", windows=("brain",))
    assert prepare_volume(read_volume(chest_ct), config=mixed).stats.is_ct
    assert not prepare_volume(vol, config=mixed).stats.is_ct  # MR: the percentile window
    assert mixed.intensity_label == "ct-window-or-percentile:brain:0.5,99.5"


# --------------------------------------------------------------------------- export round trip
@pytest.mark.parametrize("settings, plane", [
    ({"intensity": "zscore-volume", "geometry": "letterbox"}, "axial"),
    ({"intensity": "ct-window", "geometry": "letterbox"}, "coronal"),  # three windows: RGB PNGs
    ({"intensity": "minmax-8bit", "geometry": "crop"}, "coronal"),  # 0.7 x 2.5 mm pixels made square first
])
def test_an_exported_slice_embedded_as_2d_equals_the_slice_inside_the_volume(settings, plane, tokenizer, chest_ct,
                                                                             tmp_path):
    model = RadCLIPModel(tiny_clip(tokenizer), tokenizer, device="cpu",
                         preprocess=with_policy(clip_processor_config(64), **settings))
    rows = export_slices(chest_ct, tmp_path, model.preprocess, planes=(plane,))
    vol = read_volume(chest_ct)
    assert len(rows) == {"axial": 133, "coronal": 512}[plane]
    assert {r["intensity"] for r in rows} == {model.preprocess.intensity_label}
    embedded = model.embed_slices(vol, plane=plane)
    inputs, order = embedded.prepared.sampled_input_order()
    inside = embedded.embeddings.numpy()[order]
    picked = rows[::37]
    png = read_volume(tmp_path / picked[0]["image"])
    assert (png.color is not None) == (model.preprocess.channels == 3)
    cosines = [float(model.embed_image(tmp_path / r["image"]) @ inside[r["source_slice"]]) for r in picked]
    assert min(cosines) >= 0.99, cosines
    # and as a manifest row it is accepted for this model (its intensity column says how it was made)
    row_image_unit(read_volume(tmp_path / picked[0]["image"]), picked[0]["intensity"], model.preprocess)


def test_export_slices_command_writes_pngs_and_a_manifest_fragment(radclip_dir, mni, chest_ct, tmp_path):
    out = tmp_path / "exported"
    res = cli("export-slices", chest_ct, out, "--model", radclip_dir, "--intensity", "ct-window", "--windows",
              "lung", "--text", "Chest CT")
    assert res.returncode == 0, res.stderr
    assert "wrote 133 slices (ct-window:lung, letterbox 64 px)" in res.stdout  # the folder's geometry kept
    res = cli("export-slices", mni, out, "--model", radclip_dir, "--plane", "axial", "--intensity", "ct-window",
              "--windows", "lung")
    assert res.returncode == 0, res.stderr
    with open(out / "slices.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 133 + 189 and len(list(out.glob("*.png"))) == 322
    assert set(rows[0]) == {"image", "text", "source_volume", "source_slice", "source_plane", "intensity"}
    assert rows[0]["intensity"] == "ct-window:lung" and rows[0]["text"] == "Chest CT"
    assert sitk.ReadImage(str(out / rows[0]["image"])).GetSize() == (64, 64)
    m = read_manifest(out / "slices.csv")  # the chest rows are a manifest; the brain rows want their text
    assert len(m.samples) == 133 and len(m.bad) == 189 and m.samples[0].intensity == "ct-window:lung"
    res = cli("export-slices", tmp_path / "missing.nii.gz", out, "--model", radclip_dir)
    assert res.returncode == 2 and res.stderr.startswith("error: file not found")


# --------------------------------------------------------------------------- 8-bit images in manifests
def test_an_8bit_image_made_with_another_policy_is_reported_not_mixed(radclip_dir, mni_png, tmp_path):
    from RadCLIPCore.datasets import ImageTextDataset

    path, _ = mni_png
    zscore = load_model(radclip_dir, device="cpu").preprocess  # the folder's policy: the paper's z-score
    assert zscore.intensity == "zscore-volume"
    (tmp_path / "m.csv").write_text(
        "image,text,intensity\n"
        f"{path},a,\n"  # undeclared 8-bit image: not made with the z-score policy
        f"{path},b,ct-window:lung\n"  # made with another policy
        f"{path},c,{zscore.intensity_label}\n")  # made with this one
    manifest = read_manifest(tmp_path / "m.csv")
    dataset = ImageTextDataset(manifest.samples, {"a": 0, "b": 1, "c": 2}, zscore, manifest)
    assert len(dataset) == 1 and dataset[0][1] == 2
    reasons = [why for _, why in manifest.bad]
    assert "an 8-bit image holds display values" in reasons[0] and "export-slices" in reasons[0]
    assert reasons[1] == "the image was made with intensity policy ct-window:lung, the model's is zscore-volume:3"
    # an 8-bit model (CLIP's own policy) takes undeclared 8-bit images as they are
    eight_bit = clip_processor_config(64)
    manifest = Manifest(samples=manifest.samples)
    assert len(ImageTextDataset(manifest.samples[:1], {"a": 0}, eight_bit, manifest)) == 1 and not manifest.bad


# --------------------------------------------------------------------------- one recorded policy, every path
def _with_default_policy(model):
    other = RadCLIPModel(model.clip, model.tokenizer, adapter=model.adapter, preprocess=PreprocessConfig(image_size=64),
                         temperature=model.temperature, device="cpu")
    return other


def test_every_path_reads_the_recorded_policy(policy_dir, chest_ct, tmp_path):
    model = load_model(policy_dir, device="cpu")
    assert model.preprocess.intensity_label == "ct-window:mediastinum" and model.preprocess.geometry == "crop"
    expected = model.embed_volume(chest_ct, max_slices=12)
    default = _with_default_policy(model).embed_volume(chest_ct, max_slices=12)
    assert float(expected.embedding @ default.embedding) < 0.999  # the policy makes a difference
    # CLI: embed writes what the library computes with the recorded policy
    res = cli("embed", chest_ct, "--model", policy_dir, "--max-slices", 12, "-o", tmp_path / "e.npz")
    assert res.returncode == 0, res.stderr
    np.testing.assert_allclose(np.load(tmp_path / "e.npz")["embedding"], expected.embedding, atol=1e-5)
    # evaluation: its features are the same embeddings
    from RadCLIPCore.evaluation import extract_features

    (tmp_path / "v.csv").write_text(f"image,text\n{chest_ct},Chest CT\n")
    feats = extract_features(model, read_manifest(tmp_path / "v.csv").samples, poolings=("adapter",))
    full = model.embed_volume(chest_ct)
    np.testing.assert_allclose(feats.vectors["adapter"][0], full.embedding, atol=1e-5)
    # the worker and the Slicer module: Testing/test_slicer_logic.py (the same folder, a real worker)


def test_training_keeps_and_records_the_policy(policy_dir, chest_ct, mni, tmp_path):
    """Stage 2 from a folder with a policy: the cache is filled with it and the exported model
    records it; stage 1 with no preprocessing option keeps the starting model's."""
    from RadCLIPCore.stages import Stage1Config, Stage2Config, run_stage1, run_stage2

    (tmp_path / "v.csv").write_text(f"image,text\n{chest_ct},Chest CT\n{mni},Brain MRI\n")
    s2 = run_stage2(Stage2Config(train_manifest=tmp_path / "v.csv", output=tmp_path / "s2", model=policy_dir, epochs=1,
                                 batch_size=2, max_slices=6, adapter_heads=4, device="cpu"))
    assert load_model(s2["model"], device="cpu").preprocess == load_model(policy_dir, device="cpu").preprocess
    model = load_model(policy_dir, device="cpu")
    from safetensors.torch import load_file

    cached = [load_file(str(p))["slices"].float().numpy()
              for p in (tmp_path / "s2" / "embedding_cache").rglob("*.safetensors")]
    expected = model.embed_slices(read_volume(chest_ct), max_slices=6).embeddings.numpy()
    assert len(cached) == 2 and any(c.shape == expected.shape and np.allclose(c, expected, atol=2e-3) for c in cached)
    out = tmp_path / "png"
    rows = export_slices(chest_ct, out, model.preprocess)[::20]
    (tmp_path / "s.csv").write_text("image,text,intensity\n" + "".join(
        f"{out / r['image']},{'upper' if i % 2 else 'lower'},{r['intensity']}\n" for i, r in enumerate(rows)))
    s1 = run_stage1(Stage1Config(train_manifest=tmp_path / "s.csv", output=tmp_path / "s1", model=policy_dir,
                                 epochs=1, batch_size=2, device="cpu"))
    assert load_model(s1["model"], device="cpu").preprocess == model.preprocess
    assert json.loads((tmp_path / "s1" / "summary.json").read_text())["manifest_rows"]["bad"] == 0


@pytest.mark.parametrize("geometry", ["letterbox", "crop"])
def test_anatomy_masks_land_where_the_slice_lands(geometry):
    """fVLM pools patch tokens under a mask: the mask must go through the slice's geometry."""
    from RadCLIPCore.intensity import VolumeStats
    from RadCLIPCore.preprocessing import mask_geometry

    cfg = with_policy(PreprocessConfig(image_size=64, intensity="minmax-8bit"), geometry=geometry)
    mask = np.zeros((1, 60, 90), np.float32)
    mask[0, 10:30, 50:80] = 1  # off centre, in a non-square slice of non-square pixels
    spacing = (1.5, 1.0)
    image = slices_to_unit(mask * 100, VolumeStats(0, 1, 0), spacing, cfg)[0, 0]
    cover = mask_geometry(torch.from_numpy(mask)[None], spacing, cfg)[0, 0]
    assert image.shape == cover.shape == (64, 64)
    bright, covered = image > 0.5, cover > 0.5
    assert bright.sum() > 50 and float((bright ^ covered).sum()) <= 0.1 * float(bright.sum())


# --------------------------------------------------------------------------- after the review
def test_shards_packed_with_a_policy_train_with_the_same_options_and_refuse_others(chest_ct, tmp_path):
    """pack-shards and pretrain-2d given the same --intensity train; without it, the run is refused
    (the shards hold 3-window units, the starting model's policy is another)."""
    from RadCLIPCore.stages import PackConfig, Stage1Config, run_pack_shards, run_stage1

    out = tmp_path / "png"
    policy = {"intensity": "ct-window", "geometry": "letterbox"}
    cfg = with_policy(clip_processor_config(64), **policy)  # clip-tiny's default, with the policy
    rows = export_slices(chest_ct, out, cfg)[20:110:6]
    from RadCLIPCore.manifests import write_manifest

    write_manifest(tmp_path / "m.csv", [{"image": str(out / r["image"]), "text": "upper" if i % 2 else "lower",
                                         "intensity": r["intensity"], "split": "train"} for i, r in enumerate(rows)])
    run_pack_shards(PackConfig(manifest=tmp_path / "m.csv", output=tmp_path / "packed", init_config="clip-tiny",
                               **policy))
    index = json.loads((tmp_path / "packed" / "index.json").read_text())
    assert index["preprocessing"] == cfg.to_dict() and index["rows"]["bad"] == 0
    common = dict(train_manifest=tmp_path / "packed", init_config="clip-tiny", epochs=1, batch_size=4,
                  max_steps=1, device="cpu", workers=0)
    s1 = run_stage1(Stage1Config(output=tmp_path / "s1", **common, **policy))
    assert load_model(s1["model"], device="cpu").preprocess == cfg
    with pytest.raises(RadCLIPError, match="ct-window"):
        run_stage1(Stage1Config(output=tmp_path / "s1b", **common))


def test_low_bit_depth_pngs_are_8bit_display_images_from_their_header_too(tmp_path):
    from PIL import Image

    from RadCLIPCore.datasets import ImageTextDataset
    from RadCLIPCore.volume_io import read_image_info

    path = tmp_path / "one_bit.png"
    Image.fromarray((np.arange(64 * 48).reshape(48, 64) % 7 == 0)).convert("1").save(path)
    assert read_image_info(path).eight_bit and read_volume(path).array.dtype == np.uint8
    (tmp_path / "m.csv").write_text(f"image,text\n{path},a\n")
    manifest = read_manifest(tmp_path / "m.csv")
    ImageTextDataset(manifest.samples, {"a": 0}, PreprocessConfig(image_size=64), manifest)
    assert "an 8-bit image holds display values" in manifest.bad[0][1]  # up front, not mid-epoch


def test_export_refuses_a_crop_that_would_read_back_zoomed(chest_ct, tmp_path):
    cfg = PreprocessConfig(image_size=64, intensity="minmax-8bit", geometry="crop", resize=72)
    with pytest.raises(RadCLIPError, match="72 px resize and a 64 px crop"):
        export_slices(chest_ct, tmp_path, cfg)


def test_export_names_never_collide_and_the_folder_keeps_what_the_user_added(radclip_dir, chest_ct, tmp_path):
    """DICOM-UID-like names (dots) keep every part; two volumes that would write the same PNG names
    are refused before anything is written; a user's extra manifest columns survive a new export; a
    binary --manifest is one line."""
    import csv
    import shutil

    a, b = tmp_path / "1.2.840.113619.1.nii.gz", tmp_path / "1.2.840.113619.2.nii.gz"
    shutil.copy(chest_ct, a)
    shutil.copy(chest_ct, b)
    out = tmp_path / "out"
    res = cli("export-slices", a, b, out, "--model", radclip_dir, "--text", "Chest CT")
    assert res.returncode == 0, res.stderr
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 2 * 133 and pngs[0].startswith("1.2.840.113619.1_axial_")
    rows = list(csv.DictReader(open(out / "slices.csv")))
    assert len(rows) == 266 and len({r["image"] for r in rows}) == 266
    # the user adds a column; exporting a third volume keeps it
    rows[0]["label"] = "normal"
    with open(out / "slices.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    c = tmp_path / "other.nii.gz"
    shutil.copy(chest_ct, c)
    assert cli("export-slices", c, out, "--model", radclip_dir).returncode == 0
    kept = list(csv.DictReader(open(out / "slices.csv")))
    assert len(kept) == 399 and kept[0]["label"] == "normal"
    # the same names from another source volume: refused, nothing overwritten
    (tmp_path / "elsewhere").mkdir()
    clash = tmp_path / "elsewhere" / "other.nii.gz"
    shutil.copy(chest_ct, clash)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    res = cli("export-slices", clash, out, "--model", radclip_dir)
    assert res.returncode == 2 and "would overwrite" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before
    res = cli("export-slices", c, clash, tmp_path / "fresh", "--model", radclip_dir)
    assert res.returncode == 2 and "same names" in res.stderr and not list((tmp_path / "fresh").glob("*.png"))
    (out / "binary.csv").write_bytes(b"\xff\xfe\x00\x01image")
    res = cli("export-slices", c, out, "--model", radclip_dir, "--manifest", "binary.csv")
    assert res.returncode == 2 and "not UTF-8" in res.stderr and len(res.stderr.strip().splitlines()) == 1
