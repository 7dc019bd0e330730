"""Evaluation: our numbers are scikit-learn's, the CV splits are what they claim, and the whole
`evaluate` command runs on real volumes with tiny real models."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from conftest import REPO

from RadCLIPCore import RadCLIPError
from RadCLIPCore.metrics import auc_with_ci, linear_probe, matching_top1, probe_splits, retrieval_recall


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    labels = np.array(["Brain MRI"] * 30 + ["Chest CT"] * 20 + ["Head CT"] * 15)
    centres = {c: rng.normal(size=8) for c in set(labels)}
    feats = np.stack([centres[c] + rng.normal(scale=1.2, size=8) for c in labels])
    return feats / np.linalg.norm(feats, axis=1, keepdims=True), labels


def test_cv_splits_are_stratified_disjoint_and_cover_every_sample_once(blobs):
    _, labels = blobs
    splits = probe_splits(labels, folds=5, seed=1)
    assert len(splits) == 5
    seen = np.concatenate([test for _, _, test in splits])
    assert sorted(seen.tolist()) == list(range(len(labels)))  # each sample is test exactly once
    for train, val, test in splits:
        assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
        assert len(train) + len(val) + len(test) == len(labels)
        assert abs(len(test) / len(labels) - 0.2) < 0.02 and abs(len(val) / len(labels) - 0.1) < 0.02  # 70/10/20
        for part in (train, val, test):
            for c in np.unique(labels):  # stratified: each class in proportion, within one sample
                expected = np.mean(labels == c) * len(part)
                assert abs(np.sum(labels[part] == c) - expected) <= 1.0 + 1e-9, (c, len(part))


def test_probe_numbers_are_sklearns(blobs):
    feats, labels = blobs
    result = linear_probe(feats, labels, folds=5, seed=1)
    for (_, _, test), acc, f1 in zip(probe_splits(labels, 5, seed=1), result.accuracy, result.macro_f1):
        assert acc == accuracy_score(labels[test], result.predictions[test].astype(str))
        assert f1 == f1_score(labels[test], result.predictions[test].astype(str), average="macro")
    summary = result.summary()
    assert summary["accuracy_mean"] == pytest.approx(np.mean(result.accuracy))
    assert summary["f1_std"] == pytest.approx(np.std(result.macro_f1))
    assert summary["accuracy_mean"] > 0.6  # the blobs are separable: the probe learns them
    assert set(result.chosen_c) <= {0.01, 0.1, 1.0, 10.0, 100.0}


def test_a_class_with_fewer_samples_than_folds_is_named():
    labels = ["Brain MRI"] * 10 + ["Knee MRI"] * 3
    with pytest.raises(RadCLIPError, match=r"class 'Knee MRI' \(3\) has fewer samples than the 5 folds"):
        probe_splits(labels, folds=5)


def test_matching_and_retrieval_on_known_answers():
    texts = ["a", "b", "a", "c"]
    emb = {"a": np.array([1.0, 0, 0]), "b": np.array([0, 1.0, 0]), "c": np.array([0, 0, 1.0])}
    feats = np.array([[0.9, 0.1, 0], [0.1, 0.9, 0], [0.2, 0, 0.8], [0, 0, 1.0]])  # sample 2 looks like "c"
    candidates = ["a", "b", "c"]
    assert matching_top1(feats, texts, candidates, np.stack([emb[c] for c in candidates])) == 0.75
    per_sample = np.stack([emb[t] for t in texts])
    r = retrieval_recall(feats, texts, per_sample, ks=(1, 2))
    assert r["pool_size"] == 4
    assert r["i2t_R@1"] == 0.75  # sample 2 retrieves "c" first
    assert r["t2i_R@1"] == 1.0  # each text's best image has that text
    assert r["i2t_R@2"] == 1.0


def test_auc_is_sklearns_with_a_bootstrap_interval(blobs):
    feats, labels = blobs
    classes = sorted(set(labels))
    rng = np.random.default_rng(3)
    scores = np.stack([(labels == c) + rng.normal(scale=0.8, size=len(labels)) for c in classes], axis=1)
    out = auc_with_ci(labels, scores, classes, n_boot=300, seed=0)
    for i, c in enumerate(classes):
        assert out["per_class"][c] == roc_auc_score((labels == c).astype(int), scores[:, i])
    assert out["macro_auc"] == pytest.approx(np.mean(list(out["per_class"].values())))
    assert out["ci95"][0] < out["macro_auc"] < out["ci95"][1]


def test_evaluate_end_to_end(demo, hf_dir, radclip_dir, tmp_path):
    import shutil

    from RadCLIPCore.preprocessing import clip_processor_config

    _, _, volumes = demo
    # the tuned model: the same tiny CLIP and an adapter, preprocessed as the base (CLIP's processor)
    tuned = tmp_path / "tuned"
    shutil.copytree(radclip_dir, tuned)
    meta = json.loads((tuned / "radclip_config.json").read_text())
    meta["preprocessing"] = clip_processor_config(64).to_dict()
    (tuned / "radclip_config.json").write_text(json.dumps(meta))
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "RadCLIPCore", "evaluate", "--manifest", str(volumes), "--model", f"base={hf_dir}",
            "--model", f"tuned={tuned}", "--output", str(tmp_path / "eval"), "--folds", "3",
            "--bootstrap", "50"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "| Encoder | Pooling | Linear probe accuracy |" in res.stdout
    out = tmp_path / "eval"
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["encoder"], r["pooling"]) for r in rows] == [
        ("base", "global average pooling"), ("tuned", "global average pooling"), ("tuned", "slice-pooling adapter")]
    assert len((out / "ablation.csv").read_text().strip().splitlines()) == 4
    for name in ("roc_base_mean.png", "confusion_tuned_adapter.png", "modality_recognition.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    # the same encoder weights (base and tuned share the tiny CLIP) give the same GAP features
    assert rows[0]["accuracy_mean"] == rows[1]["accuracy_mean"]
    cache = {p.name: p.stat().st_mtime_ns for p in (out / "embedding_cache").glob("*.safetensors")}
    assert len(cache) == 12  # features extracted once per volume and encoder: both models share them
    res = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert res.returncode == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "embedding_cache").glob("*.safetensors")} == cache


def test_evaluate_bad_inputs(demo, hf_dir, tmp_path):
    from RadCLIPCore.commands import main

    _, _, volumes = demo
    assert main(["evaluate", "--manifest", str(volumes), "--model", "nameonly", "--output", str(tmp_path)]) == 2
    import csv

    from RadCLIPCore.manifests import write_manifest

    rows = list(csv.DictReader(open(volumes)))[:7]  # 6 brain volumes and 1 chest CT
    few = tmp_path / "few.csv"
    write_manifest(few, [{**r, "image": str(volumes.parent / r["image"])} for r in rows])
    res = subprocess.run([sys.executable, "-m", "RadCLIPCore", "evaluate", "--manifest", str(few), "--model",
                          f"base={hf_dir}", "--output", str(tmp_path / "o")], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: class 'Chest CT'")


def test_evaluate_user_errors_are_found_before_any_work(demo, hf_dir, tmp_path, capsys):
    """One class in the manifest, an output path under a file: exit 2 and one line, nothing embedded."""
    import csv

    from RadCLIPCore.commands import main
    from RadCLIPCore.manifests import write_manifest

    _, _, volumes = demo
    rows = [r for r in csv.DictReader(open(volumes)) if r["text"] == "Brain MRI"][:6]
    one = tmp_path / "one-class.csv"
    write_manifest(one, [{**r, "image": str(volumes.parent / r["image"])} for r in rows])
    assert main(["evaluate", "--manifest", str(one), "--model", f"base={hf_dir}", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one class ('Brain MRI')" in err[0], err
    assert not (tmp_path / "o" / "embedding_cache").exists()  # refused before any feature was extracted
    (tmp_path / "blocker").write_text("a file")
    assert main(["evaluate", "--manifest", str(volumes), "--model", f"base={hf_dir}",
                 "--output", str(tmp_path / "blocker" / "eval")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: output folder") and "is a file" in err[0], err
