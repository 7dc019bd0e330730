"""Every model source, the RadCLIP model folder round trip, and refusals with one clear line."""
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from RadCLIPCore import RadCLIPError, load_model, save_model
from RadCLIPCore.encoders import bundled_clip_config


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and len(msg) < 600, msg
    return msg


def test_sources_1_3_4_hold_the_same_clip_weights(hf_dir, radclip_dir, pth_file, ct_small):
    hf = load_model(hf_dir, device="cpu")
    pth = load_model(pth_file, device="cpu", config="clip-tiny")
    ours = load_model(radclip_dir, device="cpu", pooling="mean")
    ref_img, ref_txt = hf.embed_image(ct_small), hf.embed_texts(["Head CT", "Chest X-ray"])
    for m in (pth, ours):
        np.testing.assert_allclose(m.embed_image(ct_small), ref_img, atol=1e-6)
        np.testing.assert_allclose(m.embed_texts(["Head CT", "Chest X-ray"]), ref_txt, atol=1e-6)
    assert hf.pooling == pth.pooling == ours.pooling == "mean"
    assert pth.clip.text_model.embeddings.position_ids.tolist() == [list(range(77))]


def test_pth_accepts_a_config_json_and_ddp_prefixes(tmp_path, pth_file, hf_dir, ct_small):
    state = torch.load(pth_file, weights_only=True)
    wrapped = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    m = load_model(wrapped, device="cpu", config=hf_dir / "config.json")
    np.testing.assert_allclose(m.embed_image(ct_small), load_model(pth_file, config="clip-tiny").embed_image(ct_small),
                               atol=1e-6)


def test_radclip_folder_round_trips_exactly(model, tmp_path, chest_ct):
    out = save_model(model, tmp_path / "copy", card="Copied in a test.", training={"epochs": 0})
    again = load_model(out, device="cpu")
    for (k, a), (_, b) in zip(model.adapter.state_dict().items(), again.adapter.state_dict().items()):
        assert torch.equal(a, b), k
    for (k, a), (_, b) in zip(model.clip.state_dict().items(), again.clip.state_dict().items()):
        assert torch.equal(a, b), k
    assert again.temperature == model.temperature and again.preprocess == model.preprocess
    assert again.plane == model.plane and again.adapter.config == model.adapter.config
    e1, e2 = model.embed_volume(chest_ct, max_slices=8), again.embed_volume(chest_ct, max_slices=8)
    np.testing.assert_array_equal(e1.embedding, e2.embedding)
    np.testing.assert_array_equal(e1.slice_weights, e2.slice_weights)
    meta = json.loads((out / "radclip_config.json").read_text())
    assert meta["training"] == {"epochs": 0} and meta["pooling"] == "adapter"
    assert "Copied in a test." in (out / "README.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter.safetensors", "clip", "radclip_config.json"]


def test_save_over_an_existing_folder_replaces_it_whole(model, tmp_path):
    target = tmp_path / "m"
    save_model(model, target)
    (target / "stale.txt").write_text("old")
    save_model(model, target)
    assert not (target / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folders left behind


def test_pooling_mean_forces_the_baseline(radclip_dir, chest_ct):
    m = load_model(radclip_dir, device="cpu", pooling="mean")
    assert m.adapter is None and m.embed_volume(chest_ct, max_slices=4).pooling == "mean"


def test_hf_folder_without_tokenizer_uses_the_bundled_one(hf_dir, tmp_path, ct_small):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf_dir / name, bare / name)
    a = load_model(bare, device="cpu").embed_texts(["Brain MRI"])
    np.testing.assert_allclose(a, load_model(hf_dir, device="cpu").embed_texts(["Brain MRI"]), atol=1e-6)


# ------------------------------------------------------------------- hub ids, offline
def test_hub_id_offline_without_cache_says_what_to_download(tmp_path):
    with pytest.raises(RadCLIPError) as e:
        load_model("openai/clip-vit-large-patch14", offline=True, cache_dir=tmp_path / "hf")
    msg = _one_line(e)
    assert "hf download openai/clip-vit-large-patch14" in msg and str(tmp_path / "hf") in msg


def test_hf_hub_offline_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RadCLIPError, match="offline mode"):
        load_model("openai/clip-vit-large-patch14", cache_dir=tmp_path)


def test_radclip_preset_offline(tmp_path):
    with pytest.raises(RadCLIPError) as e:
        load_model("radclip", offline=True, cache_dir=tmp_path)
    assert "https://huggingface.co/zluvolyote/RadCLIP" in _one_line(e)


def test_hub_id_from_the_cache(tmp_path, hf_dir, ct_small):
    """A model in the standard HF cache layout loads offline through from_pretrained."""
    repo = tmp_path / "hub" / "models--someorg--tiny-clip"
    snap = repo / "snapshots" / ("0" * 40)
    shutil.copytree(hf_dir, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    m = load_model("someorg/tiny-clip", offline=True, cache_dir=tmp_path / "hub", device="cpu")
    np.testing.assert_allclose(m.embed_image(ct_small), load_model(hf_dir).embed_image(ct_small), atol=1e-6)


# ------------------------------------------------------------------- refusals
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    for name, writer in (("evil.pth", lambda p: torch.save({"w": torch.zeros(2), "x": _Evil(marker)}, p)),
                         ("legacy.pth", lambda p: p.write_bytes(pickle.dumps({"x": _Evil(marker)})))):
        writer(tmp_path / name)
        with pytest.raises(RadCLIPError) as e:
            load_model(tmp_path / name, config="clip-tiny")
        assert "refusing to load" in _one_line(e)
    assert not marker.exists()


def test_pth_for_another_architecture(pth_file):
    with pytest.raises(RadCLIPError) as e:
        load_model(pth_file)  # tiny weights onto the default ViT-L/14
    msg = _one_line(e)
    assert "does not match" in msg and "patch 14" in msg


def test_corrupt_and_truncated_checkpoints(tmp_path, pth_file):
    data = pth_file.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    for name in ("cut.pth", "junk.safetensors"):
        with pytest.raises(RadCLIPError) as e:
            load_model(tmp_path / name, config="clip-tiny")
        assert "cannot read" in _one_line(e)


def test_model_folders_with_missing_files(tmp_path, hf_dir, radclip_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RadCLIPError) as e:
        load_model(empty)
    assert "missing config.json, model.safetensors" in _one_line(e)
    broken = tmp_path / "no-adapter"
    shutil.copytree(radclip_dir, broken)
    (broken / "adapter.safetensors").unlink()
    with pytest.raises(RadCLIPError, match="missing adapter.safetensors"):
        load_model(broken)
    no_weights = tmp_path / "no-weights"
    shutil.copytree(radclip_dir, no_weights)
    (no_weights / "clip" / "model.safetensors").unlink()
    with pytest.raises(RadCLIPError, match="missing model.safetensors"):
        load_model(no_weights)


def test_eos_mismatch_is_refused(tmp_path, hf_dir):
    bad = tmp_path / "bad-eos"
    shutil.copytree(hf_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["text_config"]["eos_token_id"] = 7
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RadCLIPError, match="eos_token_id 7"):
        load_model(bad)


@pytest.mark.parametrize("source,match", [("./nowhere", "model not found"), ("nowhere.pth", "model not found"),
                                          ("not a model", "neither a local"), ("a/b/c", "model not found")])
def test_bad_sources(source, match):
    with pytest.raises(RadCLIPError, match=match):
        load_model(source, offline=True)


def test_bad_options(hf_dir):
    with pytest.raises(RadCLIPError, match="unknown pooling"):
        load_model(hf_dir, pooling="max")
    with pytest.raises(RadCLIPError, match="no trained slice-pooling adapter"):
        load_model(hf_dir, pooling="adapter")
    with pytest.raises(RadCLIPError, match="unknown precision"):
        load_model(hf_dir, precision="int3")
    if not torch.cuda.is_available():
        with pytest.raises(RadCLIPError, match="sees no CUDA GPU"):
            load_model(hf_dir, device="cuda")


def test_bundled_vit_l14_builds_on_meta_quickly():
    from transformers import CLIPModel

    with torch.device("meta"):
        m = CLIPModel(bundled_clip_config("clip-vit-large-patch14"))
    assert 420e6 < sum(p.numel() for p in m.parameters()) < 440e6  # ViT-L/14 CLIP: ~428M
