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
    assert hf.preprocess == pth.preprocess != ours.preprocess  # CLIP's processor vs the folder's recorded policy
    ours.preprocess = hf.preprocess  # the weights are what is compared here
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


# ------------------------------------------------------------------- damaged or wrong files: one line, not the catch-all
def _damaged(path, how):
    data = path.read_bytes()
    path.unlink()  # the fixtures' files may be links: never write through them
    path.write_bytes({"half": data[: len(data) // 2], "head": data[:50], "empty": b"",
                      "junk": os.urandom(5000)}[how])


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("how", ["half", "head", "empty", "junk"])
def test_damaged_model_safetensors_in_a_hf_or_radclip_folder(tmp_path, hf_dir, radclip_dir, how):
    for folder, weights in ((_copy(hf_dir, tmp_path / "hf"), "model.safetensors"),
                            (_copy(radclip_dir, tmp_path / "rc"), "clip/model.safetensors"),
                            (_copy(radclip_dir, tmp_path / "rc2"), "adapter.safetensors")):
        _damaged(folder / weights, how)
        with pytest.raises(RadCLIPError) as e:
            load_model(folder, device="cpu")
        msg = _one_line(e)
        assert weights.split("/")[-1] in msg and "corrupt or truncated" in msg, msg


def _edit_config(folder, edit):
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit,words", [
    (lambda c: c["vision_config"].update(num_attention_heads=5), "'vision_config.num_attention_heads'"),
    (lambda c: c["text_config"].update(num_attention_heads=3), "'text_config.num_attention_heads'"),
    (lambda c: c["vision_config"].update(hidden_size="64"), "'vision_config.hidden_size'"),
    (lambda c: c["vision_config"].update(hidden_size=0), "'vision_config.hidden_size'"),
    (lambda c: c["vision_config"].update(patch_size=0), "'vision_config.patch_size'"),
    (lambda c: c["vision_config"].update(image_size=4), "'vision_config.image_size'"),
    (lambda c: c.update(projection_dim=-1), "'projection_dim'"),
    (lambda c: c.update(text_config=None), "'text_config'"),
    (lambda c: c.update(vision_config=[1]), "'vision_config'"),
    (lambda c: c.update(logit_scale_init_value="x"), "logit_scale_init_value"),
    (lambda c: c.update(model_type="bert"), '"bert" model, not CLIP'),
    (lambda c: c.update(model_type="clip_vision_model"), "not CLIP"),
    (lambda c: c.update(projection_dim=32), "do not match"),  # valid config, other weights
    (lambda c: c["vision_config"].update(num_hidden_layers=1), "do not match"),
    (lambda c: c["vision_config"].update(image_size=56), "do not match"),
])
def test_hf_config_json_problems(tmp_path, hf_dir, edit, words):
    folder = _copy(hf_dir, tmp_path / "hf")
    _edit_config(folder, edit)
    with pytest.raises(RadCLIPError) as e:
        load_model(folder, device="cpu")
    msg = _one_line(e)
    assert words in msg and "config.json" in msg, msg


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "", "null"])
def test_hf_config_json_that_is_not_a_json_object(tmp_path, hf_dir, text):
    folder = _copy(hf_dir, tmp_path / "hf")
    (folder / "config.json").write_text(text)
    with pytest.raises(RadCLIPError) as e:
        load_model(folder, device="cpu")
    assert "config.json" in _one_line(e)


def test_a_bad_config_for_a_pth_is_one_line(tmp_path, pth_file, hf_dir):
    bad = _copy(hf_dir, tmp_path / "hf")
    _edit_config(bad, lambda c: c["vision_config"].update(num_attention_heads=5))
    for config, words in ((bad / "config.json", "not divisible"), ("clip-vit-nothing", "not found;"),
                          (tmp_path / "none.json", "not found")):
        with pytest.raises(RadCLIPError) as e:
            load_model(pth_file, config=config)
        assert words in _one_line(e)


@pytest.mark.parametrize("name,content,words", [
    ("notes.txt", b"hello world\n", "not a model file"),
    ("table.csv", b"a,b\n1,2\n", "not a model file"),
    ("noise.bin", bytes(range(256)) * 16, "not a model file"),
    ("weights.pth", b"", "is empty"),
    ("settings.json", b'{"a": 1}', "not a model file"),
    ("image.png", b"\x89PNG\r\n\x1a\n" + bytes(100), "not a model file"),
], ids=lambda v: v if isinstance(v, str) and "." in v else "")
def test_a_file_that_is_no_model(tmp_path, name, content, words):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(RadCLIPError) as e:
        load_model(tmp_path / name, config="clip-tiny")
    assert words in _one_line(e)


def test_a_config_json_given_as_the_model_points_to_its_folder(hf_dir, radclip_dir):
    for path in (hf_dir / "config.json", radclip_dir / "radclip_config.json"):
        with pytest.raises(RadCLIPError) as e:
            load_model(path)
        assert f"pass the folder '{path.parent}'" in _one_line(e)


def test_pth_damaged_after_the_pickle_header_is_one_line(tmp_path):
    (tmp_path / "g.pth").write_bytes(b"\x80\x02" + bytes(range(200)))  # pickle magic, garbage after
    torch.save({"w": torch.zeros(2)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    data = (tmp_path / "legacy.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:30])
    for name in ("g.pth", "cut.pth"):
        with pytest.raises(RadCLIPError):
            load_model(tmp_path / name, config="clip-tiny")


def test_a_safetensors_state_dict_under_another_suffix(tmp_path, pth_file, ct_small):
    from safetensors.torch import save_file

    save_file(torch.load(pth_file, weights_only=True), str(tmp_path / "weights.pt"))
    m = load_model(tmp_path / "weights.pt", config="clip-tiny", device="cpu")
    np.testing.assert_allclose(m.embed_image(ct_small), load_model(pth_file, config="clip-tiny").embed_image(ct_small),
                               atol=1e-6)


def test_a_folder_that_is_neither(tmp_path, hf_dir):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(RadCLIPError, match="missing config.json, model.safetensors"):
        load_model(other)


@pytest.mark.parametrize("device", ["meta", "xpu", "hpu", "privateuseone", "mps", "ipu", "cuda:-1", "cpu:x"])
def test_devices_we_cannot_compute_on(hf_dir, device):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(RadCLIPError) as e:
        load_model(hf_dir, device=device)
    msg = _one_line(e)
    assert f"'{device}'" in msg and "auto" in msg and "cpu" in msg, msg


def test_a_bad_device_fails_before_the_weights_are_read(tmp_path):
    (tmp_path / "w.pth").write_bytes(b"never read")
    with pytest.raises(RadCLIPError, match="device 'meta'"):
        load_model(tmp_path / "w.pth", device="meta")


# ------------------------------------------------------------------- air-gapped: fast, one whole line
def _closed_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_volume(tmp_path_factory):
    import SimpleITK as sitk

    path = tmp_path_factory.mktemp("vol") / "v.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)), str(path))
    return path


def _run_offline_cli(tmp_path, tiny_volume, *extra, **env_extra):
    import subprocess
    import sys
    import time

    from conftest import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf-home"),
               HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", **env_extra)
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "RadCLIPCore", "rank", str(tiny_volume), "--prompt", "x", *extra],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)  # a hang guard, not a benchmark
    return res, time.monotonic() - start


@pytest.mark.parametrize("model,command", [((), "hf download openai/clip-vit-large-patch14"),
                                           (("--model", "radclip"), "hf download zluvolyote/RadCLIP RadCLIP.pth")])
@pytest.mark.parametrize("offline", [{}, {"HF_HUB_OFFLINE": "1"}], ids=["unreachable", "HF_HUB_OFFLINE"])
def test_no_network_gives_one_whole_line_at_once(tmp_path, tiny_volume, model, command, offline):
    res, _ = _run_offline_cli(tmp_path, tiny_volume, *model, **offline)
    lines = res.stderr.splitlines()
    assert res.returncode == 2 and res.stdout == "" and len(lines) == 1, res.stderr
    line = lines[0]
    assert line.startswith("error: ") and command in line and str(tmp_path / "hf-home" / "hub") in line, line
    assert ("offline mode" if offline else "cannot be reached") in line, line
    assert line.rstrip()[-1].isalnum() or line.rstrip()[-1] in ".)`", line  # not cut off mid-word
    assert "Retrying" not in res.stderr and "unexpected" not in line


@pytest.fixture
def silent_endpoint(monkeypatch):
    """A hub endpoint that accepts connections and never answers (a black-holing proxy)."""
    import socket

    from huggingface_hub import constants

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    yield
    server.close()


def test_hub_probe_is_bounded_when_the_endpoint_never_answers(tmp_path, monkeypatch, silent_endpoint):
    import time

    from RadCLIPCore import hub

    monkeypatch.setattr(hub, "HUB_PROBE_SECONDS", 0.5)
    start = time.monotonic()
    for source in ("someorg/not-cached", "radclip"):
        with pytest.raises(RadCLIPError) as e:
            load_model(source, offline=False, cache_dir=tmp_path / "hub")
        assert "cannot be reached" in _one_line(e) and "no answer within 0.5 s" in str(e.value)
    assert time.monotonic() - start < 10


def _fake_cache(root, repo, files):
    snap = root / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for src in files:
        shutil.copy(src, snap / src.name)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)


def test_cached_hub_sources_load_without_asking_the_network(tmp_path, hf_dir, pth_file, silent_endpoint, ct_small):
    """Cache first: not in offline mode, with a hub that never answers, cached models load at once
    (the hub client would first wait for the hub's answer)."""
    import time

    _fake_cache(tmp_path / "hub", "someorg/tiny-clip", hf_dir.iterdir())
    _fake_cache(tmp_path / "hub", "zluvolyote/RadCLIP", [pth_file])
    start = time.monotonic()
    m = load_model("someorg/tiny-clip", offline=False, cache_dir=tmp_path / "hub", device="cpu")
    p = load_model("radclip", offline=False, cache_dir=tmp_path / "hub", config="clip-tiny", device="cpu")
    assert time.monotonic() - start < 5
    assert m.source == "someorg/tiny-clip" and p.dim == 64
    np.testing.assert_allclose(m.embed_image(ct_small), load_model(hf_dir).embed_image(ct_small), atol=1e-6)


def test_messages_are_never_cut_mid_word(tmp_path):
    with pytest.raises(RadCLIPError) as e:
        load_model("radclip", offline=True, cache_dir=tmp_path)
    msg = _one_line(e)
    assert msg.endswith("path") or msg[-1] in ".)`", msg
    evil = tmp_path / "evil.pth"
    torch.save({"x": _Evil(tmp_path / "marker")}, evil)
    with pytest.raises(RadCLIPError) as e:
        load_model(evil, config="clip-tiny")
    assert "posix.system" in _one_line(e) or "nt.system" in str(e.value)


@pytest.mark.parametrize("how,words", [("junk", "damaged or incomplete"), ("cut", "damaged or incomplete"),
                                       ("evil", "refusing to load")])
def test_damaged_pytorch_model_bin_in_a_hf_folder(tmp_path, hf_dir, how, words):
    folder = _copy(hf_dir, tmp_path / "hf")
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    weights = folder / "pytorch_model.bin"
    if how == "evil":
        torch.save({"x": _Evil(tmp_path / "marker")}, weights)
    else:
        torch.save(state, weights)
        data = weights.read_bytes()
        weights.write_bytes(b"hello" if how == "junk" else data[: len(data) // 3])
    with pytest.raises(RadCLIPError) as e:
        load_model(folder, device="cpu")
    assert words in _one_line(e)
    assert not (tmp_path / "marker").exists()


def test_pooling_adapter_on_a_folder_without_one(model, tmp_path):
    from RadCLIPCore import RadCLIPModel

    mean_only = save_model(RadCLIPModel(model.clip, model.tokenizer, temperature=0.05), tmp_path / "mean")
    with pytest.raises(RadCLIPError, match="no trained slice-pooling adapter"):
        load_model(mean_only, pooling="adapter")
    assert load_model(mean_only).pooling == "mean"
