"""A model folder whose radclip_config.json is wrong is refused on load with one line naming the key,
never loaded into wrong answers (NaN probabilities, a silently dropped adapter) or a crash."""
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import save_file

from RadCLIPCore import AdapterConfig, PreprocessConfig, RadCLIPError, load_model
from RadCLIPCore.anatomy import AnatomyHead
from RadCLIPCore.commands import main


def folder_with(radclip_dir, tmp_path, edit, name="m"):
    """A copy of the tiny RadCLIP folder (weights linked, not copied) whose radclip_config.json
    `edit(meta)` changed; `edit` may return a whole replacement object."""
    out = tmp_path / name
    out.mkdir()
    for entry in radclip_dir.iterdir():
        if entry.name != "radclip_config.json":
            (out / entry.name).symlink_to(entry)
    meta = json.loads((radclip_dir / "radclip_config.json").read_text())
    replaced = edit(meta)
    (out / "radclip_config.json").write_text(json.dumps(meta if replaced is None else replaced))
    return out


def set_key(dotted, value):
    def edit(meta):
        *parents, last = dotted.split(".")
        node = meta
        for p in parents:
            node = node[p]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return edit


DELETE = object()

# (key edited, value, key the message must name, words it must contain)
BAD = [
    ("preprocessing.std", [0, 0, 0], "preprocessing.std", "3 finite positive numbers, got [0, 0, 0]"),
    ("preprocessing.std", [0.2, 0.2], "preprocessing.std", "3 finite positive numbers"),
    ("preprocessing.std", "abc", "preprocessing.std", 'got "abc"'),
    ("preprocessing.std", [0.2, -0.2, 0.2], "preprocessing.std", "positive"),
    ("preprocessing.mean", [math.nan, 0.4, 0.4], "preprocessing.mean", "3 finite numbers"),
    ("preprocessing.mean", None, "preprocessing.mean", "got null"),
    ("preprocessing.image_size", "64", "preprocessing.image_size", "integer"),
    ("preprocessing.image_size", 0, "preprocessing.image_size", "at least 1"),
    ("preprocessing.image_size", 64.5, "preprocessing.image_size", "integer"),
    ("preprocessing.image_size", 32, "preprocessing.image_size", "image_size 64"),
    ("preprocessing.zscore_clip", 0, "preprocessing.zscore_clip", "positive"),
    ("preprocessing.zscore_clip", math.inf, "preprocessing.zscore_clip", "finite"),
    ("preprocessing.gamma", 2, "preprocessing.gamma", "unknown preprocessing setting"),
    ("preprocessing", None, "preprocessing", "object"),
    ("preprocessing", [224], "preprocessing", "object"),
    ("preprocessing", DELETE, "preprocessing", "missing"),
    ("pooling", "max", "pooling", '"mean" or "adapter"'),
    ("pooling", None, "pooling", "got null"),
    ("adapter.num_heads", 5, "adapter.num_heads", "not divisible"),
    ("adapter.num_heads", 0, "adapter.num_heads", "at least 1"),
    ("adapter.num_heads", "4", "adapter.num_heads", "integer"),
    ("adapter.dim", "64", "adapter.dim", "integer"),
    ("adapter.dim", True, "adapter.dim", "integer"),
    ("adapter.dim", 32, "adapter.dim", "projection_dim 64"),
    ("adapter.out_dim", 32, "adapter.out_dim", "projection_dim 64"),
    ("adapter.pos_anchors", 1, "adapter.pos_anchors", "at least 2"),
    ("adapter.pos_anchors", 2.5, "adapter.pos_anchors", "integer"),
    ("adapter.dropout", 1, "adapter.dropout", "[0, 1)"),
    ("adapter.dropout", -0.1, "adapter.dropout", "[0, 1)"),
    ("adapter.dropout", "0.5", "adapter.dropout", "number"),
    ("adapter.dim", DELETE, "adapter.dim", "missing"),
    ("adapter.heads", 4, "adapter.heads", "unknown adapter setting"),
    ("adapter", None, "adapter", "missing"),
    ("adapter", [64], "adapter", "object"),
    ("temperature", "x", "temperature", "finite positive number"),
    ("temperature", None, "temperature", "got null"),
    ("temperature", 0, "temperature", "positive"),
    ("temperature", math.inf, "temperature", "finite"),
    ("temperature", math.nan, "temperature", "finite"),
    ("temperature", DELETE, "temperature", "missing"),
    ("plane", "oblique", "plane", "auto, axial, coronal or sagittal"),
    ("plane", 3, "plane", "auto, axial, coronal or sagittal"),
    ("format", "other", "format", '"radclip"'),
    ("format", DELETE, "format", "missing"),
    ("format_version", "x", "format_version", "integer"),
    ("format_version", 0, "format_version", "at least 1"),
    ("format_version", 99, "format_version", "newer"),
    ("embedding_dim", 32, "embedding_dim", "projection_dim 64"),
    ("embedding_dim", "64", "embedding_dim", "integer"),
]


@pytest.mark.parametrize("key,value,named,words", BAD, ids=[f"{k}={v!r}" for k, v, *_ in BAD])
def test_a_wrong_key_is_named_in_one_line(radclip_dir, tmp_path, key, value, named, words):
    folder = folder_with(radclip_dir, tmp_path, set_key(key, value))
    with pytest.raises(RadCLIPError) as e:
        load_model(folder, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    assert msg.startswith(f"model folder '{folder}': radclip_config.json key '{named}' "), msg
    assert words in msg, msg


def test_the_config_is_checked_even_when_pooling_mean_skips_the_adapter(radclip_dir, tmp_path):
    folder = folder_with(radclip_dir, tmp_path, set_key("adapter.num_heads", 5))
    with pytest.raises(RadCLIPError, match="'adapter.num_heads'"):
        load_model(folder, device="cpu", pooling="mean")


@pytest.mark.parametrize("text,words", [("[1, 2]", "JSON object"), ("{not json", "not valid JSON"),
                                        ("", "not valid JSON"), ('"radclip"', "JSON object")])
def test_a_config_that_is_not_a_json_object(radclip_dir, tmp_path, text, words):
    folder = folder_with(radclip_dir, tmp_path, lambda meta: None)
    (folder / "radclip_config.json").write_text(text)
    with pytest.raises(RadCLIPError) as e:
        load_model(folder)
    assert words in str(e.value) and "radclip_config.json" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------- anatomy head
@pytest.fixture
def anatomy_dir(radclip_dir, tmp_path):
    head = AnatomyHead(64, [1, 2], {1: "lung", 2: "heart"})
    folder = folder_with(radclip_dir, tmp_path, lambda meta: meta.update(anatomy_head=head.config()), "anat")
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(folder / "anatomy_head.safetensors"))
    return folder


def test_a_valid_anatomy_head_loads(anatomy_dir):
    m = load_model(anatomy_dir, device="cpu")
    assert m.anatomy_head.labels == [1, 2] and m.anatomy_head.names == {1: "lung", 2: "heart"}


@pytest.mark.parametrize("key,value,named", [
    ("dim", 32, "anatomy_head.dim"), ("dim", "64", "anatomy_head.dim"), ("dim", DELETE, "anatomy_head.dim"),
    ("labels", DELETE, "anatomy_head.labels"), ("labels", "lung", "anatomy_head.labels"),
    ("labels", [1, "two"], "anatomy_head.labels"), ("labels", [1, 1], "anatomy_head.labels"),
    ("labels", [], "anatomy_head.labels"), ("names", ["lung"], "anatomy_head.names"),
    ("names", {"x": "lung"}, "anatomy_head.names"), ("names", {"1": 5}, "anatomy_head.names"),
])
def test_a_wrong_anatomy_head_key_is_named(anatomy_dir, key, value, named):
    meta = json.loads((anatomy_dir / "radclip_config.json").read_text())
    set_key(f"anatomy_head.{key}", value)(meta)
    (anatomy_dir / "radclip_config.json").write_text(json.dumps(meta))
    with pytest.raises(RadCLIPError) as e:
        load_model(anatomy_dir)
    assert f"radclip_config.json key '{named}' " in str(e.value) and "\n" not in str(e.value)


def test_anatomy_head_weights_missing_or_damaged(anatomy_dir):
    weights = anatomy_dir / "anatomy_head.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(RadCLIPError, match="anatomy_head.safetensors.*corrupt or truncated"):
        load_model(anatomy_dir)
    head = AnatomyHead(64, [1, 2, 3])  # three labels: not what the config says
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(weights))
    with pytest.raises(RadCLIPError, match="anatomy_head.safetensors' does not match"):
        load_model(anatomy_dir)
    weights.unlink()
    with pytest.raises(RadCLIPError, match="missing anatomy_head.safetensors"):
        load_model(anatomy_dir)


# ------------------------------------------------------------------- the configs themselves
def test_config_classes_check_every_construction():
    for bad in (dict(std=(0, 0, 0)), dict(image_size="224"), dict(mean=(0.5,)), dict(zscore_clip=-1)):
        with pytest.raises(RadCLIPError, match="'preprocessing."):
            PreprocessConfig(**bad)
    for bad in (dict(dim=30, num_heads=4), dict(dim=0), dict(dim=64, dropout=1.0), dict(dim=64, pos_anchors=1),
                dict(dim=64, out_dim=-1)):
        with pytest.raises(RadCLIPError, match="'adapter."):
            AdapterConfig(**bad)
    with pytest.raises(ValueError, match="divisible"):  # still a ValueError, as it always was
        AdapterConfig(dim=30, num_heads=4)
    cfg = PreprocessConfig.from_dict({"image_size": 96, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg == PreprocessConfig.from_dict(cfg.to_dict())
    assert AdapterConfig.from_dict(AdapterConfig(dim=64, num_heads=4).to_dict()) == AdapterConfig(dim=64, num_heads=4)


# ------------------------------------------------------------------- through the command line
@pytest.fixture(scope="module")
def small_volume(tmp_path_factory):
    path = tmp_path_factory.mktemp("vol") / "small.nrrd"
    arr = np.random.default_rng(0).normal(size=(6, 20, 20)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    return path


@pytest.mark.parametrize("key,value", [("preprocessing.std", [0, 0, 0]), ("pooling", "max"),
                                       ("adapter.num_heads", 5), ("temperature", "x")])
def test_cli_refuses_a_wrong_config_with_exit_2(radclip_dir, tmp_path, small_volume, capsys, key, value):
    folder = folder_with(radclip_dir, tmp_path, set_key(key, value))
    rc = main(["rank", str(small_volume), "--prompt", "Chest CT", "--prompt", "Brain MRI", "--model", str(folder),
               "--json"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", (rc, out, err)
    assert err.count("\n") == 1 and err.startswith("error: model folder") and f"'{key}'" in err, err


def test_cli_good_folder_still_ranks(radclip_dir, small_volume, capsys):
    assert main(["rank", str(small_volume), "--prompt", "Chest CT", "--prompt", "Brain MRI",
                 "--model", str(radclip_dir), "--json"]) == 0
    probs = [p["probability"] for p in json.loads(capsys.readouterr().out)["prompts"]]
    assert all(math.isfinite(p) for p in probs) and abs(sum(probs) - 1) < 1e-6


def test_adapter_weights_that_do_not_fit_the_config(radclip_dir, tmp_path):
    from RadCLIPCore import SlicePoolingAdapter

    folder = folder_with(radclip_dir, tmp_path, set_key("adapter.pos_anchors", 8))  # file holds 16 anchors
    with pytest.raises(RadCLIPError) as e:
        load_model(folder)
    assert "adapter.safetensors' does not match" in str(e.value) and "pos" in str(e.value)
    (folder / "adapter.safetensors").unlink()
    adapter = SlicePoolingAdapter(AdapterConfig(dim=64, num_heads=4, pos_anchors=8))
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(folder / "adapter.safetensors"))
    assert load_model(folder).adapter.config.pos_anchors == 8
    assert torch.equal(load_model(folder).adapter.pos, adapter.pos)
