"""CPU precision (`auto` per CPU, int8) and the provisional answer (a subset of slices first), on
real volumes and real (tiny) transformers models. The fidelity on trained models is measured in
benchmarks/bench_precision.py; here: the choice, the mechanics, and that nothing changes the result."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from RadCLIPCore import RadCLIPError, load_model, save_model
from RadCLIPCore.encoders import (CPU_PRECISION_ENV, auto_cpu_precision, cpu_capabilities, is_quantized,
                                  resolve_precision)
from RadCLIPCore.model import PROVISIONAL_SLICES, embedding_order

NONE = dict(avx2=False, avx512=False, avx512_bf16=False, amx=False, vnni=False, int8_kernels=False)


def test_auto_follows_what_the_cpu_runs_natively(monkeypatch):
    monkeypatch.delenv(CPU_PRECISION_ENV, raising=False)
    assert auto_cpu_precision(dict(NONE, avx2=True, int8_kernels=True)) == "int8"
    assert auto_cpu_precision(dict(NONE, avx512=True, vnni=True, int8_kernels=True)) == "int8"
    # measured: int8 4.2x and bf16 1.8x fp32 with AVX512-BF16 and VNNI; bf16 4-5x with AMX
    assert auto_cpu_precision(dict(NONE, avx512=True, avx512_bf16=True, vnni=True, int8_kernels=True)) == "int8"
    assert auto_cpu_precision(dict(NONE, avx512=True, avx512_bf16=True)) == "bf16"  # no int8 kernels
    assert auto_cpu_precision(dict(NONE, amx=True, avx2=True, int8_kernels=True)) == "bf16"
    assert auto_cpu_precision(dict(NONE, avx2=True)) == "fp32"  # no int8 kernels in this torch
    assert auto_cpu_precision(dict(NONE)) == "fp32"  # e.g. an old CPU
    assert set(cpu_capabilities()) == set(NONE)  # read from this CPU without timing anything
    assert resolve_precision("auto", torch.device("cpu")) in ("fp32", "bf16", "int8")
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"  # unchanged on the GPU


def test_the_pin_and_bad_choices_are_one_clear_error(monkeypatch):
    monkeypatch.setenv(CPU_PRECISION_ENV, "int8")
    assert resolve_precision("auto", torch.device("cpu")) == "int8"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"  # asked for by name: the pin is for auto
    monkeypatch.setenv(CPU_PRECISION_ENV, "int4")
    with pytest.raises(RadCLIPError, match="RADCLIP_CPU_PRECISION='int4'"):
        resolve_precision("auto", torch.device("cpu"))
    with pytest.raises(RadCLIPError, match="CPU only"):
        resolve_precision("int8", torch.device("cuda"))
    with pytest.raises(RadCLIPError, match="unknown precision 'int4'"):
        resolve_precision("int4", torch.device("cpu"))


@pytest.mark.skipif(not cpu_capabilities()["int8_kernels"], reason="this torch has no x86 int8 kernels")
def test_int8_quantises_the_vision_tower_only_and_a_slice_never_depends_on_its_batch(radclip_dir, mni, tmp_path):
    fp32 = load_model(radclip_dir, device="cpu", precision="fp32")
    int8 = load_model(radclip_dir, device="cpu", precision="int8")
    save_model(int8, tmp_path / "before")  # nothing quantised until an image is encoded
    a = int8.embed_volume(mni, max_slices=12, batch_size=3)
    assert is_quantized(int8.clip.vision_model) and not is_quantized(int8.clip.text_model)
    assert not is_quantized(int8.clip.visual_projection)  # the operating points' fingerprint reads it
    int8.clear_cache()
    b = int8.embed_volume(mni, max_slices=12, batch_size=64)
    np.testing.assert_array_equal(a.slice_embeddings, b.slice_embeddings)
    reference = fp32.embed_volume(mni, max_slices=12)
    cosines = (a.slice_embeddings * reference.slice_embeddings).sum(axis=1)
    assert cosines.min() > 0.98 and not np.allclose(a.slice_embeddings, reference.slice_embeddings, atol=1e-6)
    assert int8.ranking_record(a, ["brain", "chest"])["precision"] == "int8"
    with pytest.raises(RadCLIPError, match="int8"):
        save_model(int8, tmp_path / "after")
    assert not (tmp_path / "after").exists()


@pytest.mark.skipif(not cpu_capabilities()["int8_kernels"], reason="this torch has no x86 int8 kernels")
def test_the_command_line_says_which_precision_runs(radclip_dir, mni):
    def rank(*extra):
        out = subprocess.run([sys.executable, "-m", "RadCLIPCore", "rank", str(mni), "--max-slices", "12", "--prompt", "brain",
                              "--prompt", "chest", "--model", str(radclip_dir), "--device", "cpu", *extra],
                             capture_output=True, text=True, cwd=REPO, timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert json.loads(rank("--json", "--precision", "int8"))["precision"] == "int8"
    assert json.loads(rank("--json"))["precision"] == "fp32"  # auto, pinned by the suite
    assert "(int8 on cpu)" in rank("--precision", "int8").splitlines()[0]


def test_the_embedding_order_puts_evenly_spaced_slices_first():
    assert [g.tolist() for g in embedding_order(10)] == [list(range(10))]
    assert len(embedding_order(2 * PROVISIONAL_SLICES)) == 1
    head, rest = embedding_order(133)
    assert len(head) == PROVISIONAL_SLICES and head[0] == 0 and head[-1] == 132
    assert np.all(np.diff(head) >= 8) and sorted(np.concatenate([head, rest]).tolist()) == list(range(133))


def test_a_provisional_answer_comes_first_and_changes_nothing(radclip_dir, chest_ct):
    """The early answer is made of PROVISIONAL_SLICES evenly spaced slices; the final embedding is
    the one a run without it gives, bit for bit."""
    model = load_model(radclip_dir, device="cpu")
    seen, progress = [], []
    final = model.embed_volume(chest_ct, max_slices=64, batch_size=5, provisional=seen.append,
                               progress=lambda done, total: progress.append(done))
    assert len(seen) == 1 and len(seen[0].sampled_slices) == PROVISIONAL_SLICES
    assert progress[0] == 5 and progress[-1] == 64
    early = seen[0]
    assert len(early.slice_weights) == len(final.slice_weights) == 133  # every input slice
    assert set(early.sampled_slices) <= set(final.sampled_slices)
    # the early slices' embeddings are the final ones (the same forward passes)
    at = {int(s): i for i, s in enumerate(final.sampled_slices)}
    np.testing.assert_array_equal(early.slice_embeddings,
                                  final.slice_embeddings[[at[int(s)] for s in early.sampled_slices]])
    model.clear_cache()
    one_shot = model.embed_volume(chest_ct, max_slices=64, batch_size=5)
    np.testing.assert_array_equal(one_shot.embedding, final.embedding)
    np.testing.assert_array_equal(one_shot.slice_weights, final.slice_weights)
    assert model.embed_volume(chest_ct, max_slices=64, provisional=seen.append) is not None and len(seen) == 1  # cached
    small = []
    model.clear_cache()
    model.embed_volume(chest_ct, max_slices=2 * PROVISIONAL_SLICES, provisional=small.append)
    assert small == []  # too few slices for an early answer to be worth it


@pytest.mark.skipif(not cpu_capabilities()["int8_kernels"], reason="this torch has no x86 int8 kernels")
def test_evaluation_measures_in_fp32_on_a_cpu_and_caches_keep_precisions_apart(radclip_dir, tmp_path, monkeypatch):
    from RadCLIPCore.embedding_cache import SliceEmbeddingCache
    from RadCLIPCore.evaluation import EvaluationConfig

    monkeypatch.setenv(CPU_PRECISION_ENV, "int8")  # the CPU's auto would be int8
    config = EvaluationConfig(manifest=tmp_path / "m.csv", output=tmp_path / "out", device="cpu")
    assert config.precision() == "fp32"
    keys = {p: SliceEmbeddingCache(tmp_path, load_model(radclip_dir, device="cpu", precision=p), "auto", None).fingerprint
            for p in ("fp32", "int8")}
    assert keys["fp32"] != keys["int8"]  # the same weights until int8 quantises at the first image
