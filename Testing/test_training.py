"""Headless pretraining: losses, the shared training loop, both stages, resume, torchrun DDP.

Data: small augmented copies of the real MNI152 brain and chest CT (Training/demo_data.py),
slices as PNG for stage 1 and volumes as NIfTI for stage 2; a tiny random CLIP (`clip-tiny`).
"""
import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import REPO

from RadCLIPCore import RadCLIPError, load_model
from RadCLIPCore.datasets import ImageTextDataset, positive_groups
from RadCLIPCore.losses import info_nce, same_text_targets
from RadCLIPCore.manifests import build_text, read_manifest, write_manifest
from RadCLIPCore.trainer import EarlyStopping, TrainConfig, Trainer, TrainingHooks, DistContext

from test_anatomy import studies  # noqa: F401  (a fixture)

STAGE1 = REPO / "Training" / "pretrain_2d.py"
STAGE2 = REPO / "Training" / "pretrain_adapter.py"


@pytest.fixture(scope="session")
def even_slices(demo):
    """16 training + 4 validation slices (divisible by 2 processes and the batch), half of each text."""
    out, slices, _ = demo
    rows = list(csv.DictReader(open(slices)))
    texts = sorted({r["text"] for r in rows})
    assert len(texts) == 2

    def take(split, n):
        return [r for t in texts for r in [x for x in rows if x["split"] == split and x["text"] == t][:n]]

    train, val = take("train", 8), take("val", 2)
    path = out / "even.csv"
    write_manifest(path, train + val)
    return path


def run(script, *args, timeout=600, **kw):
    env = dict(os.environ, PYTHONPATH="", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


def run_code(code, *args, timeout=600):
    env = dict(os.environ, PYTHONPATH="", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


# runs a training script, SIGKILLing it right after it has logged step `step`
_KILL_AFTER_STEP = """
import os, runpy, signal, sys
sys.path.insert(0, {repo!r})
from RadCLIPCore import trainer
write = trainer.MetricsLog.write


def write_then_die(self, kind, record, tensorboard=True):
    write(self, kind, record, tensorboard)
    if kind == "steps" and record["step"] == {step}:
        os.kill(os.getpid(), signal.SIGKILL)


trainer.MetricsLog.write = write_then_die
sys.argv = [{script!r}] + sys.argv[1:]
runpy.run_path({script!r}, run_name="__main__")
"""


def stage1_args(manifest, out, *extra):
    return ["--train-manifest", manifest, "--output", out, "--init-config", "clip-tiny", "--batch-size", 8,
            "--no-progress", "--seed", 3, *extra]


# ------------------------------------------------------------------- losses
def test_info_nce_matches_the_definition():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    logits = 10 * img @ txt.t()
    expected = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.t(), torch.arange(6))) / 2
    torch.testing.assert_close(info_nce(img, txt, 10.0), expected)
    # with all-distinct groups the calibrated loss is plain InfoNCE
    torch.testing.assert_close(info_nce(img, txt, 10.0, torch.arange(6)), expected)


def test_same_text_targets():
    t = same_text_targets(torch.tensor([0, 1, 0, 0]))
    torch.testing.assert_close(t.sum(1), torch.ones(4))
    assert t[0].tolist() == pytest.approx([1 / 3, 0, 1 / 3, 1 / 3])


def test_identical_texts_make_plain_and_calibrated_infonce_the_same_function():
    """With a frozen text tower, k copies of a label give identical logit rows and columns, so the
    one-hot and the soft targets give the same loss and the same gradients."""
    torch.manual_seed(0)
    texts = F.normalize(torch.randn(2, 16), dim=-1)
    ids = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])  # duplicate-heavy, as radiology labels are
    images = F.normalize(torch.randn(8, 16), dim=-1).requires_grad_(True)
    plain = info_nce(images, texts[ids], 14.0)
    (g_plain,) = torch.autograd.grad(plain, images)
    calibrated = info_nce(images, texts[ids], 14.0, ids)
    (g_cal,) = torch.autograd.grad(calibrated, images)
    torch.testing.assert_close(plain, calibrated)
    torch.testing.assert_close(g_plain, g_cal)


def test_grouped_normal_texts_are_not_pushed_apart():
    """fVLM's false negatives: two normal findings worded differently. Plain InfoNCE keeps their
    images apart as different classes; grouping them as positives pulls them together."""
    index = {"Chest X-ray, no acute findings": 0, "Chest X-ray, normal study": 1, "Chest X-ray with effusion": 2}
    groups = positive_groups(index, r"no acute|normal")
    assert groups.tolist() == [3, 3, 2]
    torch.manual_seed(0)
    texts = F.normalize(torch.randn(3, 16), dim=-1)
    ids = torch.tensor([0, 1, 2, 0, 1, 2])
    cosine = {}
    for name, positives in (("plain", None), ("calibrated", groups[ids])):
        images = (texts[ids] + 0.1 * torch.randn(6, 16)).requires_grad_(True)
        opt = torch.optim.SGD([images], lr=0.2)
        for _ in range(100):
            opt.zero_grad()
            info_nce(F.normalize(images, dim=-1), texts[ids], 14.0, positives).backward()
            opt.step()
        f = F.normalize(images.detach(), dim=-1)
        cosine[name] = float((f[0] @ f[1] + f[3] @ f[4]) / 2)  # image of one normal text vs the other
    start = float(texts[0] @ texts[1])
    # plain InfoNCE treats the other normal text as a negative: the two normal images stay about as
    # far apart as their texts are; grouped, they are pulled together
    assert cosine["plain"] < start + 0.15 and cosine["calibrated"] > cosine["plain"] + 0.4, (cosine, start)
    with pytest.raises(RadCLIPError, match="not a valid regular expression"):
        positive_groups(index, "(")


# ------------------------------------------------------------------- manifests
def test_text_builder():
    assert build_text("Abdomen", "CT", "prostate lesion") == "Abdomen CT with prostate lesion"
    assert build_text("Brain", "MRI") == "Brain MRI"
    assert build_text("Brain", "MRI", "  ") == "Brain MRI"
    assert build_text(None, None, "x") == ""


def test_bad_manifest_rows_are_reported_and_skipped(demo, tmp_path):
    out, _, _ = demo
    good = sorted((out / "slices").glob("*.png"))[:12]
    (tmp_path / "junk.png").write_bytes(b"not a png")
    rows = [{"image": str(p), "text": ("Brain MRI", "Chest CT")[i % 2], "split": "train"}
            for i, p in enumerate(good[:10])]
    rows += [{"image": str(good[10]), "region": "Chest", "modality": "CT", "split": "val"},
             {"image": str(good[11]), "region": "Brain", "modality": "MRI", "split": "val"}]
    rows += [{"image": str(tmp_path / "missing.png"), "text": "Brain MRI"},
             {"image": str(good[0]), "text": "  "},
             {"image": str(tmp_path / "junk.png"), "text": "Brain MRI", "split": "train"},
             {"image": str(good[1]), "text": "Brain MRI", "split": "holdout"}]
    manifest = tmp_path / "m.csv"
    write_manifest(manifest, rows)
    parsed = read_manifest(manifest)
    assert len(parsed.samples) == 13 and len(parsed.bad) == 3  # the junk PNG is found when it is read
    assert parsed.split("val")[0].text == "Chest CT"
    res = run(STAGE1, *stage1_args(manifest, tmp_path / "run", "--epochs", 1, "--batch-size", 4))
    assert res.returncode == 0, res.stderr
    warning = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "4 bad manifest row(s) skipped in m.csv" in warning[0]
    for reason in ("file not found", "empty text", "cannot read", "unknown split"):
        assert reason in warning[0], reason
    assert "manifest rows: 10 train, 2 val, 0 test (not used), 4 bad (skipped)" in res.stdout.splitlines()


@pytest.mark.parametrize("content,match", [("a,b\n1,2\n", "no 'image' column"), ("image,text\nnope.png,x\n", "no usable rows")])
def test_unusable_manifests(tmp_path, content, match):
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(RadCLIPError, match=match):
        read_manifest(tmp_path / "m.csv")


def test_jsonl_manifest_with_volume_slices(demo, tmp_path):
    out, _, _ = demo
    vol = sorted((out / "volumes").glob("mni152_*.nii.gz"))[0]
    lines = [json.dumps({"image": str(vol), "text": "Brain MRI", "slice": i, "plane": "axial"}) for i in (5, 10, 99)]
    (tmp_path / "m.jsonl").write_text("\n".join(lines + ["{broken"]) + "\n")
    parsed = read_manifest(tmp_path / "m.jsonl")
    assert [s.slice for s in parsed.samples] == [5, 10, 99] and parsed.bad[0][1].startswith("not JSON")
    ds = ImageTextDataset(parsed.samples, {"Brain MRI": 0}, load_model_preprocess(), parsed)
    assert len(ds) == 2 and "outside the volume" in parsed.report()  # slice 99 of a 40-slice volume


def load_model_preprocess():
    from RadCLIPCore import PreprocessConfig

    return PreprocessConfig(image_size=64)


# ------------------------------------------------------------------- the loop
class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(4, 4)


def _tiny_trainer(tmp_path, lr, **cfg):
    torch.manual_seed(0)
    module = _Linear()
    data = [(torch.randn(4), torch.randn(4)) for _ in range(16)]

    def loss_fn(m, batch):
        x, y = batch
        return F.mse_loss(m.w(x), y)

    collate = lambda b: (torch.stack([x for x, _ in b]), torch.stack([y for _, y in b]))  # noqa: E731
    config = TrainConfig(batch_size=4, lr=lr, **cfg)
    return Trainer(module, loss_fn, data, data[:8], collate, config, tmp_path, DistContext())


def test_early_stopping_triggers(tmp_path):
    trainer = _tiny_trainer(tmp_path, lr=1e-12, epochs=10, patience=2, min_delta=1e-3)
    summary = trainer.fit()
    assert summary["stopped_early"] and summary["epochs_run"] == 3 and summary["best_epoch"] == 0
    assert len((tmp_path / "epochs.jsonl").read_text().splitlines()) == 3
    stopper = EarlyStopping(patience=2)
    assert [stopper.update(v, e) for e, v in enumerate([1.0, 0.9, 0.95, 0.91])] == [True, True, False, False]
    assert stopper.should_stop


def test_refuses_to_overwrite_a_run_and_resume_needs_one(tmp_path):
    _tiny_trainer(tmp_path, lr=1e-3, epochs=1).fit()
    with pytest.raises(RadCLIPError, match="already holds a run"):
        _tiny_trainer(tmp_path, lr=1e-3, epochs=1).fit()
    with pytest.raises(RadCLIPError, match="nothing to resume"):
        _tiny_trainer(tmp_path / "other", lr=1e-3, epochs=1).fit(resume=True)
    with pytest.raises(RadCLIPError, match="--batch-size was 4"):
        t = _tiny_trainer(tmp_path, lr=1e-3, epochs=1)
        t.config.batch_size = 8
        t.fit(resume=True)


def test_cosine_schedule_from_base_lr(tmp_path):
    trainer = _tiny_trainer(tmp_path, lr=1e-4, epochs=2, warmup_steps=2)
    trainer.fit()
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


_SAVER = """
import io, os, signal, sys, torch
sys.path.insert(0, {repo!r})
from RadCLIPCore.trainer import Trainer, TrainConfig, DistContext
m = torch.nn.Linear(1000, 1000)
t = Trainer(m, lambda mod, b: mod(b).sum(), [torch.zeros(1000)] * 4, None, torch.stack, TrainConfig(batch_size=2),
            {out!r}, DistContext())
real_save = torch.save


def save_then_die(obj, path):  # killed inside the save: half of the file is on disk
    data = io.BytesIO()
    real_save(obj, data)
    with open(path, "wb") as fh:
        fh.write(data.getvalue()[: len(data.getvalue()) // 2])
        fh.flush()
        os.fsync(fh.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


for epoch in range({kill_at} + 1):
    t.epoch = epoch
    with torch.no_grad():
        m.weight.fill_(float(epoch))  # every checkpoint's weights say which epoch it is
    if epoch == {kill_at}:
        torch.save = save_then_die
    t.save_checkpoint("last.pt")
"""


@pytest.mark.parametrize("kill_at", [1, 2])
def test_a_kill_during_checkpoint_save_leaves_the_previous_one_loadable(tmp_path, kill_at):
    """The kill lands inside a save by construction (no timing): the previous checkpoint survives whole."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", _SAVER.format(repo=str(REPO), out=str(out), kill_at=kill_at)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    payload = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    weight = payload["module"]["weight"]
    assert payload["epoch"] == kill_at - 1 and torch.all(weight == kill_at - 1)
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")] == ["last.pt"]


# ------------------------------------------------------------------- stage 1
def test_stage1_learns_and_writes_a_usable_model(demo, tmp_path):
    _, slices, _ = demo
    res = run(STAGE1, *stage1_args(slices, tmp_path / "s1", "--epochs", 4, "--lr", 1e-3))
    assert res.returncode == 0, res.stderr
    epochs = [json.loads(line) for line in (tmp_path / "s1" / "epochs.jsonl").read_text().splitlines()]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    val = [e["val_loss"] for e in epochs]
    best = torch.load(tmp_path / "s1" / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == val.index(min(val))  # the exported model is the best epoch's
    assert json.loads((tmp_path / "s1" / "model" / "radclip_config.json").read_text())["training"]["best_epoch"] == \
        best["epoch"]
    assert (tmp_path / "s1" / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "s1" / "steps.csv").exists() and (tmp_path / "s1" / "checkpoints" / "best.pt").exists()
    model = load_model(tmp_path / "s1" / "model", device="cpu")
    assert model.pooling == "mean" and model.temperature == pytest.approx(0.07)
    meta = json.loads((tmp_path / "s1" / "model" / "radclip_config.json").read_text())
    assert meta["training"]["stage"] == 1 and meta["training"]["loss"] == "calibrated"
    # the text tower was frozen: identical to the random initial one
    from RadCLIPCore.encoders import bundled_tokenizer, new_clip_model

    init = new_clip_model("clip-tiny", bundled_tokenizer(), seed=3)
    for k, v in init.text_model.state_dict().items():
        assert torch.equal(v, model.clip.text_model.state_dict()[k]), k
    assert not torch.equal(init.visual_projection.weight, model.clip.visual_projection.weight)


def _weights(run_dir):
    return load_file(str(run_dir / "model" / "clip" / "model.safetensors"))


def test_killed_mid_epoch_and_resumed_ends_at_the_same_weights(demo, tmp_path):
    _, slices, _ = demo
    args = stage1_args(slices, None, "--epochs", 4, "--batch-size", 4, "--lr", 1e-3)
    straight = tmp_path / "straight"
    res = run(STAGE1, *[straight if a is None else a for a in args])
    assert res.returncode == 0, res.stderr
    spe = len([1 for line in (straight / "steps.jsonl").read_text().splitlines() if json.loads(line)["epoch"] == 0])

    killed = tmp_path / "killed"
    # killed without warning right after step 2 of epoch 3 is logged: by construction, not by timing
    code = _KILL_AFTER_STEP.format(repo=str(REPO), script=str(STAGE1), step=2 * spe + 2)
    res = run_code(code, *[killed if a is None else a for a in args])
    assert res.returncode == -signal.SIGKILL, res.stderr
    steps = killed / "steps.jsonl"
    done = len(steps.read_text().splitlines())
    assert done == 2 * spe + 2 < 3 * spe, "the kill must land mid-epoch"
    assert torch.load(killed / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    res = run(STAGE1, *[killed if a is None else a for a in args], "--resume")
    assert res.returncode == 0, res.stderr
    a, b = _weights(straight), _weights(killed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert len(steps.read_text().splitlines()) == 4 * spe  # the replayed part is logged once


def one_and_two_processes(script, args, tmp_path):
    """Run a training script alone (into tmp_path/one) and under torchrun with 2 gloo processes
    (tmp_path/two); `args` holds None where the output folder goes."""
    one, two = tmp_path / "one", tmp_path / "two"
    res = run(script, *[one if a is None else a for a in args])
    assert res.returncode == 0, res.stderr
    env = dict(os.environ, PYTHONPATH="", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), *map(str, [two if a is None else a for a in args])],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return one, two


def test_torchrun_two_processes_match_one_process(even_slices, tmp_path):
    args = stage1_args(even_slices, None, "--epochs", 2, "--lr", 1e-3, "--learn-temperature")
    one, two = one_and_two_processes(STAGE1, args, tmp_path)
    a, b = _weights(one), _weights(two)
    for k in a:
        if k.endswith("k_proj.bias"):
            # softmax ignores a bias added to every key: its true gradient is 0, and AdamW turns the
            # float noise of two different reduction orders into full-size steps
            continue
        # float noise of two reduction orders through 4 AdamW steps (measured: up to 5.4e-5 on
        # weights of magnitude 0.08, patch embedding with CLIP's 8-bit inputs)
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-4, msg=k)
    la = [json.loads(x)["loss"] for x in (one / "steps.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (two / "steps.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-4)
    ta = json.loads((one / "model" / "radclip_config.json").read_text())["temperature"]
    tb = json.loads((two / "model" / "radclip_config.json").read_text())["temperature"]
    assert ta == pytest.approx(tb, rel=1e-5) and ta != pytest.approx(0.07)  # learned, identically


# ------------------------------------------------------------------- stage 2
def test_stage2_trains_from_the_cache_and_reuses_it(demo, tmp_path):
    _, _, volumes = demo
    base = tmp_path / "base"
    from RadCLIPCore import RadCLIPModel, save_model
    from RadCLIPCore.encoders import bundled_tokenizer, new_clip_model

    tok = bundled_tokenizer()
    save_model(RadCLIPModel(new_clip_model("clip-tiny", tok, seed=0), tok), base)
    common = ["--train-manifest", volumes, "--model", base, "--batch-size", 4, "--no-progress", "--adapter-heads", 4,
              "--cache-dir", tmp_path / "cache", "--lr", 1e-3]
    res = run(STAGE2, *common, "--output", tmp_path / "a", "--epochs", 6, "--slice-subsample", 0.6)
    assert res.returncode == 0, res.stderr
    assert "10 computed, 0 reused" in res.stdout
    entries = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.safetensors")}
    assert len(entries) == 10
    assert load_file(str(next((tmp_path / "cache").glob("*.safetensors"))))["slices"].dtype == torch.float16
    epochs = [json.loads(line) for line in (tmp_path / "a" / "epochs.jsonl").read_text().splitlines()]
    assert min(e["train_loss"] for e in epochs[1:]) < epochs[0]["train_loss"]

    res = run(STAGE2, *common, "--output", tmp_path / "b", "--epochs", 1)
    assert res.returncode == 0, res.stderr
    assert "0 computed, 10 reused" in res.stdout  # the second run computes no embeddings
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.safetensors")} == entries

    model = load_model(tmp_path / "a" / "model", device="cpu")
    assert model.pooling == "adapter"
    vol = sorted((demo[0] / "volumes").glob("chest_ct_*.nii.gz"))[-1]
    emb = model.embed_volume(vol)
    assert abs(emb.slice_weights.sum() - 1) < 1e-5
    res = run(STAGE2, *common, "--output", tmp_path / "c", "--epochs", 1, "--model", tmp_path / "nothing-here")
    assert res.returncode == 2 and res.stderr.strip().startswith("error: model not found")


def test_slicer_style_invocation(even_slices, tmp_path):
    """Slicer --python-script runs the file with sys.argv = [script, args...], from another folder."""
    code = ("import runpy, sys; sys.argv = [{s!r}] + sys.argv[1:]; runpy.run_path({s!r}, run_name='__main__')"
            .format(s=str(STAGE1)))
    env = dict(os.environ, PYTHONPATH="", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code, *map(str, stage1_args(even_slices, tmp_path / "r", "--epochs", 1))],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "r" / "model" / "radclip_config.json").exists()
    bad = subprocess.run([sys.executable, "-c", code, "--train-manifest", str(tmp_path / "none.csv"), "--output",
                          str(tmp_path / "x"), "--init-config", "clip-tiny"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=env)
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: manifest not found: {tmp_path / 'none.csv'}"


def test_demo_quick_runs_end_to_end(tmp_path):
    """The README's main job, in its --quick form: data from packages, both stages, evaluation."""
    res = run(REPO / "Training" / "demo.py", "--quick", "--output", tmp_path / "demo")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "top-1 accuracy, slice-pooling adapter:" in res.stdout and "not a clinical model" in res.stdout
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["held_out_volumes"] >= 2 and set(results["distractors"]) == {"A puppy", "A cat", "A life vest"}
    for path in ("stage1/model/radclip_config.json", "stage2/model/adapter.safetensors", "attention.png",
                 "stage1/loss_curves.png", "stage2/loss_curves.png"):
        assert (tmp_path / "demo" / path).exists(), path


def test_stages_run_from_python_and_report_through_hooks_only(even_slices, tmp_path, capsys):
    """The library prints nothing: where the rows went, each epoch and the batch progress reach
    the caller through TrainingHooks (the command layer prints them)."""
    from RadCLIPCore.stages import Stage1Config, run_stage1

    seen = {"message": [], "epoch": [], "progress": []}
    hooks = TrainingHooks(message=seen["message"].append, on_epoch=seen["epoch"].append,
                          progress=lambda *call: seen["progress"].append(call))
    summary = run_stage1(Stage1Config(train_manifest=even_slices, output=tmp_path / "run", init_config="clip-tiny",
                                      epochs=2, batch_size=8, seed=3), hooks)
    assert capsys.readouterr().out == ""
    assert seen["message"] == ["preprocessing: minmax-8bit, CLIP crop 64 px from a shortest edge of 64",
                               "manifest rows: 16 train, 4 val, 0 test (not used), 0 bad (skipped)"]
    assert [r["epoch"] for r in seen["epoch"]] == [0, 1] and seen["epoch"][0]["best"]
    assert seen["progress"][:3] == [("epoch 1/2", 0, 2), ("epoch 1/2", 1, 2), ("epoch 1/2", 2, 2)]
    assert ("validation", 1, 1) in seen["progress"]
    assert summary["model"] == str(tmp_path / "run" / "model")


def test_the_anatomy_stage_embeds_only_the_texts_it_trains_on(studies, tmp_path, monkeypatch):  # noqa: F811
    """Per-anatomy texts go through the text tower; the full reports they come from do not."""
    from RadCLIPCore.anatomy_stage import AnatomyStageConfig, run_anatomy_stage
    from RadCLIPCore.model import RadCLIPModel
    from RadCLIPCore.reports import anatomy_texts, read_lexicon

    embedded, real = [], RadCLIPModel.embed_texts
    monkeypatch.setattr(RadCLIPModel, "embed_texts", lambda self, texts: embedded.extend(texts) or real(self, texts))
    run_anatomy_stage(AnatomyStageConfig(train_manifest=studies / "studies.csv", lexicon=studies / "lexicon.json",
                                         init_config="clip-tiny", epochs=1, batch_size=3, min_patches=0.25,
                                         cache_dir=tmp_path / "cache", output=tmp_path / "run"))
    lexicon = read_lexicon(studies / "lexicon.json")
    reports = [r["text"] for r in csv.DictReader(open(studies / "studies.csv"))]
    assert sorted(embedded) == sorted({t for r in reports for t in anatomy_texts(r, lexicon)[0].values()})
    assert "Liver lesion again seen. Right lower lobe nodule." in reports and \
        "Liver lesion again seen. Right lower lobe nodule." not in embedded


def test_gradient_accumulation_steps_the_optimizer_less_often(tmp_path):
    plain = _tiny_trainer(tmp_path / "a", lr=1e-3, epochs=1)
    plain.fit()
    accum = _tiny_trainer(tmp_path / "b", lr=1e-3, epochs=1, accum_steps=2)
    accum.fit()
    assert plain.step == 4 and accum.step == 2  # 16 samples, batch 4


def test_gradient_checkpointing_gives_the_same_training(even_slices, tmp_path):
    base = stage1_args(even_slices, None, "--epochs", 1)
    for name, extra in (("plain", []), ("ckpt", ["--grad-checkpointing"])):
        res = run(STAGE1, *[tmp_path / name if a is None else a for a in base], *extra)
        assert res.returncode == 0, res.stderr
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "ckpt")
    for k in a:
        if not k.endswith("k_proj.bias"):  # see the torchrun test: zero true gradient, noise steps
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=5e-5, msg=k)
