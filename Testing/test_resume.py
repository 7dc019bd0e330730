"""--resume continues the same run or refuses in one line: checkpoints record what the run was
trained from (starting weights, manifests, settings that shape the weights), and damaged
checkpoint files are named, fallen back from where that is exact, never half-used."""
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from RadCLIPCore import RadCLIPError, RadCLIPModel, save_model
from RadCLIPCore.encoders import bundled_tokenizer, new_clip_model
from RadCLIPCore.trainer import CHECKPOINT_VERSION, DistContext, TrainConfig, Trainer

from test_training import STAGE2, _tiny_trainer, run


# ------------------------------------------------------------------- the trainer, in process
def _interrupt_at(trainer, epoch):
    """Stop the run when `epoch` starts, as a kill between epochs would."""
    real = trainer.train_epoch

    def train_epoch(log):
        if trainer.epoch == epoch:
            raise KeyboardInterrupt
        return real(log)

    trainer.train_epoch = train_epoch
    return trainer


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.module.state_dict().items()}


# lr 1.0 on this toy problem: the validation loss is best at epoch 1 (of 0..3), so best.pt and
# last.pt hold different epochs
def test_a_damaged_last_checkpoint_resumes_from_best_and_ends_at_the_same_weights(tmp_path, caplog):
    straight = _tiny_trainer(tmp_path / "straight", lr=1.0, epochs=4, patience=10)
    straight.fit()
    assert straight.early.best_epoch == 1
    with pytest.raises(KeyboardInterrupt):
        _interrupt_at(_tiny_trainer(tmp_path / "run", lr=1.0, epochs=4, patience=10), 3).fit()
    _truncate(tmp_path / "run" / "checkpoints" / "last.pt")
    resumed = _tiny_trainer(tmp_path / "run", lr=1.0, epochs=4, patience=10)
    with caplog.at_level(logging.WARNING, logger="RadCLIPCore"):
        resumed.fit(resume=True)
    assert "last.pt is damaged" in caplog.text and "resuming from best.pt (epoch 2)" in caplog.text
    for k, v in _weights(straight).items():
        assert torch.equal(v, resumed.module.state_dict()[k]), k
    resumed.load_best()
    straight.load_best()
    for k, v in _weights(straight).items():
        assert torch.equal(v, resumed.module.state_dict()[k]), k


def test_a_damaged_best_checkpoint_of_an_earlier_epoch_is_refused_not_half_used(tmp_path):
    _tiny_trainer(tmp_path, lr=1.0, epochs=4, patience=10).fit()
    _truncate(tmp_path / "checkpoints" / "best.pt")
    with pytest.raises(RadCLIPError, match=r"best\.pt is damaged .*weights of the best epoch \(2\)"):
        trainer = _tiny_trainer(tmp_path, lr=1.0, epochs=4, patience=10)
        trainer.fit(resume=True)
        trainer.load_best()  # today: an unguarded torch.load


def test_a_damaged_best_checkpoint_of_the_last_epoch_is_written_again(tmp_path, caplog):
    first = _tiny_trainer(tmp_path, lr=0.3, epochs=2)
    first.fit()
    assert first.early.best_epoch == 1
    _truncate(tmp_path / "checkpoints" / "best.pt")
    trainer = _tiny_trainer(tmp_path, lr=0.3, epochs=2)
    with caplog.at_level(logging.WARNING, logger="RadCLIPCore"):
        trainer.fit(resume=True)
    assert "written again from last.pt" in caplog.text
    trainer.load_best()
    assert torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("content,match", [
    (b"", r"last\.pt is empty"),
    (b"epoch,loss\n1,0.5\n", r"last\.pt is damaged .*not a training checkpoint"),
])
def test_an_unreadable_last_checkpoint_without_best_is_named(tmp_path, content, match):
    _tiny_trainer(tmp_path, lr=1e-3, epochs=1).fit()
    (tmp_path / "checkpoints" / "best.pt").unlink()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(content)
    with pytest.raises(RadCLIPError, match=match + ".*no best.pt to fall back on"):
        _tiny_trainer(tmp_path, lr=1e-3, epochs=1).fit(resume=True)


def test_load_best_names_a_damaged_file(tmp_path):
    trainer = _tiny_trainer(tmp_path, lr=1e-3, epochs=1)
    trainer.fit()
    (tmp_path / "checkpoints" / "best.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(RadCLIPError, match=r"cannot export the best epoch: .*best\.pt is damaged"):
        trainer.load_best()


def test_an_old_checkpoint_without_an_origin_is_refused(tmp_path):
    _tiny_trainer(tmp_path, lr=1e-3, epochs=1).fit()
    path = tmp_path / "checkpoints" / "last.pt"
    payload = torch.load(path, weights_only=True)
    payload["version"] = CHECKPOINT_VERSION - 1
    del payload["origin"]
    torch.save(payload, path)
    with pytest.raises(RadCLIPError, match="older RadCLIPSlicer and does not record what the run was trained from"):
        _tiny_trainer(tmp_path, lr=1e-3, epochs=1).fit(resume=True)


def test_the_origin_and_the_schedule_must_match(tmp_path):
    _tiny_trainer(tmp_path, lr=1e-3, epochs=1, weight_decay=0.05).fit()
    with pytest.raises(RadCLIPError, match="--weight-decay was 0.05 in the checkpoint, now 0.1"):
        _tiny_trainer(tmp_path, lr=1e-3, epochs=1, weight_decay=0.1).fit(resume=True)
    other = tmp_path / "other"
    trainer = _tiny_trainer(other, lr=1e-3, epochs=1)
    trainer.origin = {"--adapter-heads": 4, "preprocessing": {"image_size": 64}, "weights": "a" * 32}
    trainer.fit()
    for origin, match in [({"--adapter-heads": 8, "preprocessing": {"image_size": 64}, "weights": "a" * 32},
                           "^cannot resume: --adapter-heads was 4 in the checkpoint, now 8$"),
                          ({"--adapter-heads": 4, "preprocessing": {"image_size": 96}, "weights": "a" * 32},
                           "preprocessing image_size was 64 in the checkpoint, now 96"),
                          ({"--adapter-heads": 4, "preprocessing": {"image_size": 64}, "weights": "b" * 32},
                           r"the starting model differs from the checkpoint's \(weights fingerprint aaaa")]:
        trainer = _tiny_trainer(other, lr=1e-3, epochs=1)
        trainer.origin = origin
        with pytest.raises(RadCLIPError, match=match):
            trainer.fit(resume=True)


# ------------------------------------------------------------------- stage 2, end to end
@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Two tiny models of one architecture, different weights."""
    root = tmp_path_factory.mktemp("bases")
    tok = bundled_tokenizer()
    for seed in (0, 1):
        save_model(RadCLIPModel(new_clip_model("clip-tiny", tok, seed=seed), tok), root / f"base{seed}")
    return root


@pytest.fixture(scope="module")
def adapter_run(demo, bases, tmp_path_factory):
    """A finished 2-epoch stage-2 run whose validation loss is best at epoch 1 (lr ~0: no change)."""
    _, _, volumes = demo
    root = tmp_path_factory.mktemp("adapter")
    common = ["--train-manifest", volumes, "--batch-size", 4, "--no-progress", "--adapter-heads", 4, "--lr", 1e-12,
              "--epochs", 2, "--cache-dir", root / "cache"]
    res = run(STAGE2, *common, "--model", bases / "base0", "--output", root / "run")
    assert res.returncode == 0, res.stderr
    best = torch.load(root / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == 0
    return root, common, res.stdout


def test_stage2_says_where_every_row_went(adapter_run):
    root, _, stdout = adapter_run
    assert "manifest rows: 8 train, 2 val, 2 test (not used), 0 bad (skipped)" in stdout.splitlines()
    rows = json.loads((root / "run" / "summary.json").read_text())["manifest_rows"]
    assert rows == {"train": 8, "val": 2, "test": 2, "bad": 0, "without_split": 0, "total": 12}


def _exported(run_dir):
    return (run_dir / "model" / "adapter.safetensors").read_bytes()


def _one_line_error(res):
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot resume: "), res.stderr
    return lines[0]


def test_resume_with_another_starting_model_is_refused(adapter_run, bases):
    root, common, _ = adapter_run
    before = _exported(root / "run")
    res = run(STAGE2, *common, "--model", bases / "base1", "--output", root / "run", "--resume")
    line = _one_line_error(res)
    assert "the starting model differs from the checkpoint's (weights fingerprint" in line
    assert "use the same --model, or a new --output" in line
    assert _exported(root / "run") == before  # nothing exported


@pytest.mark.parametrize("flag,value,message", [
    ("--adapter-heads", 8, "--adapter-heads was 4 in the checkpoint, now 8"),
    ("--pos-anchors", 8, "--pos-anchors was 32 in the checkpoint, now 8"),  # today: inside load_state_dict
    ("--loss", "infonce", "--loss was 'calibrated' in the checkpoint, now 'infonce'"),
    ("--slice-subsample", 0.5, "--slice-subsample was 1.0 in the checkpoint, now 0.5"),
])
def test_resume_after_changing_a_setting_is_refused_by_name(adapter_run, bases, flag, value, message):
    root, common, _ = adapter_run
    args = [*common, "--model", bases / "base0", "--output", root / "run", "--resume"]
    i = args.index(flag) if flag in args else None
    if i is None:
        args += [flag, value]
    else:
        args[i + 1] = value
    assert _one_line_error(run(STAGE2, *args)) == f"error: cannot resume: {message}"


def test_resume_with_an_edited_manifest_is_refused(adapter_run, bases, tmp_path):
    root, common, _ = adapter_run
    manifest = common[1]
    edited = manifest.parent / "edited.csv"
    edited.write_text("".join(manifest.read_text().splitlines(keepends=True)[:-1]))  # one row less
    args = [*common, "--model", bases / "base0", "--output", root / "run", "--resume"]
    args[1] = edited
    line = _one_line_error(run(STAGE2, *args))
    assert "the file given to --train-manifest differs from the one the checkpoint was trained on" in line


def test_damaged_checkpoints_through_the_entry_point(adapter_run, bases, tmp_path):
    root, common, _ = adapter_run
    run_dir = tmp_path / "copy"
    shutil.copytree(root / "run", run_dir)
    args = [*common, "--model", bases / "base0", "--output", run_dir, "--resume"]
    # best.pt (epoch 1) damaged, last.pt (epoch 2) intact: the best weights are gone -> refuse
    best = run_dir / "checkpoints" / "best.pt"
    saved = best.read_bytes()
    _truncate(best)
    before = _exported(run_dir)
    line = _one_line_error(run(STAGE2, *args))
    assert "best.pt is damaged" in line and "weights of the best epoch (1)" in line and "new --output" in line
    assert _exported(run_dir) == before
    # last.pt damaged, best.pt intact: resume from best.pt, train epoch 2 again, same result
    best.write_bytes(saved)
    _truncate(run_dir / "checkpoints" / "last.pt")
    res = run(STAGE2, *args)
    assert res.returncode == 0, res.stderr
    assert "resuming from best.pt (epoch 1) instead" in res.stderr
    a, b = (load_file(str(d / "model" / "adapter.safetensors")) for d in (root / "run", run_dir))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1


def test_a_nan_loss_stops_the_run_with_one_line_instead_of_exporting_it(tmp_path):
    layer = torch.nn.Linear(2, 2)
    data = [torch.ones(2) for _ in range(4)]
    trainer = Trainer(layer, lambda module, batch: module(batch).sum() * float("nan"), data, None, torch.stack,
                      TrainConfig(epochs=2, batch_size=2), tmp_path, DistContext())
    with pytest.raises(RadCLIPError, match="training diverged: the loss is nan at epoch 1, step 1"):
        trainer.fit()
