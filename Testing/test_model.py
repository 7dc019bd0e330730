"""The public inference API on real volumes with a tiny real CLIP (transformers) model."""
import logging

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from RadCLIPCore import RadCLIPError, Volume, read_volume


def _volume(image):
    return Volume(sitk.GetArrayFromImage(image), image.GetSpacing(), np.reshape(image.GetDirection(), (3, 3)))


@pytest.fixture(scope="module")
def mni_small(mni):
    return sitk.ReadImage(str(mni))[::3, ::3, ::3]


def _count_vision_calls(model):
    calls = []
    handle = model.clip.vision_model.register_forward_hook(lambda m, i, o: calls.append(i))
    return calls, handle


def test_embed_volume_chest_ct(model, chest_ct):
    emb = model.embed_volume(chest_ct, max_slices=24)
    assert emb.embedding.shape == (64,) and emb.embedding.dtype == np.float32
    assert abs(np.linalg.norm(emb.embedding) - 1) < 1e-5
    assert emb.plane == "axial" and emb.slice_axis == 0
    assert emb.slice_weights.shape == (133,) and abs(emb.slice_weights.sum() - 1) < 1e-5
    assert len(emb.sampled_slices) == 24 and emb.slice_embeddings.shape == (24, 64)
    assert emb.pooling == "adapter"
    assert np.all(np.diff(emb.sampled_slices) > 0)


def test_orientation_does_not_change_the_embedding(model, mni_small):
    """A permuted/flipped copy with a matching direction matrix is the same anatomy."""
    reference = model.embed_volume(_volume(mni_small), plane="axial")
    copy = sitk.Flip(sitk.PermuteAxes(mni_small, [2, 0, 1]), [True, False, True])
    emb = model.embed_volume(_volume(copy), plane="axial")
    np.testing.assert_allclose(emb.embedding, reference.embedding, atol=1e-5)
    # the weights follow the slices: axial slices run along the copy's axis that came from k
    assert emb.slice_axis != reference.slice_axis
    np.testing.assert_allclose(np.sort(emb.slice_weights), np.sort(reference.slice_weights), atol=1e-6)


def test_weights_follow_a_flipped_slice_axis(model, mni_small):
    reference = model.embed_volume(_volume(mni_small), plane="axial")
    flipped = model.embed_volume(_volume(sitk.Flip(mni_small, [False, False, True])), plane="axial")
    np.testing.assert_allclose(flipped.slice_weights, reference.slice_weights[::-1], atol=1e-6)
    np.testing.assert_allclose(flipped.embedding, reference.embedding, atol=1e-5)


def test_result_does_not_depend_on_the_slice_batch_size(model, mni_small):
    model.clear_cache()
    a = model.embed_volume(_volume(mni_small), batch_size=3)
    model.clear_cache()
    b = model.embed_volume(_volume(mni_small), batch_size=64)
    np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-5)
    np.testing.assert_allclose(a.slice_weights, b.slice_weights, atol=1e-6)


def test_mean_pooling_is_the_mean_of_slice_embeddings(mean_model, mni_small):
    emb = mean_model.embed_volume(_volume(mni_small))
    mean = emb.slice_embeddings.mean(0)
    np.testing.assert_allclose(emb.embedding, mean / np.linalg.norm(mean), atol=1e-5)
    np.testing.assert_allclose(emb.slice_weights, 1 / len(emb.slice_weights), atol=1e-7)


def test_repeated_embedding_is_served_from_the_cache(model, chest_ct):
    model.clear_cache()
    calls, handle = _count_vision_calls(model)
    try:
        first = model.embed_volume(chest_ct, max_slices=16)
        n = len(calls)
        assert n > 0
        again = model.embed_volume(chest_ct, max_slices=16)  # same file
        same_content = model.embed_volume(read_volume(chest_ct), max_slices=16)  # same content, in memory
        assert len(calls) == n and again is first and same_content is first
        other_settings = model.embed_volume(chest_ct, max_slices=8)
        assert len(calls) > n and other_settings is not first
        n = len(calls)
        model.rank(first, ["Chest CT", "a brand new prompt"])  # ranking costs only the text tower
        assert len(calls) == n
    finally:
        handle.remove()


def test_edited_content_is_not_served_stale(model, mni_small):
    vol = _volume(mni_small)
    a = model.embed_volume(vol)
    edited = Volume(vol.array.copy(), vol.spacing, vol.direction)
    edited.array[10:20] = 0
    assert not np.allclose(model.embed_volume(edited).embedding, a.embedding)


def test_rank_probabilities_are_the_softmax_of_cosine_over_temperature(model, chest_ct):
    emb = model.embed_volume(chest_ct, max_slices=16)
    prompts = ["Chest CT", "Brain MRI", "Abdomen CT with liver lesion", "A puppy", "A cat", "A life vest"]
    ranked = model.rank(emb, prompts)
    assert sorted(r.prompt for r in ranked) == sorted(prompts)
    cos = [r.cosine for r in ranked]
    assert cos == sorted(cos, reverse=True)
    texts = model.embed_texts([r.prompt for r in ranked])
    np.testing.assert_allclose(cos, texts @ emb.embedding, atol=1e-5)
    expected = torch.softmax(torch.tensor(cos, dtype=torch.float64) / model.temperature, 0).numpy()
    np.testing.assert_allclose([r.probability for r in ranked], expected, rtol=1e-6)
    assert abs(sum(r.probability for r in ranked) - 1) < 1e-9
    assert model.temperature == pytest.approx(0.05)
    prompt, prob, cosine = ranked[0]  # plain tuples too


def test_text_embeddings_are_cached_per_text(model):
    calls = []
    handle = model.clip.text_model.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        a = model.embed_texts(["Head CT", "Knee MRI"])
        n = len(calls)
        b = model.embed_texts(["Knee MRI", "Head CT", "Knee MRI"])
        assert len(calls) == n
        np.testing.assert_array_equal(b[0], a[1])
        assert b.shape == (3, 64)
        np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1, atol=1e-5)
    finally:
        handle.remove()


def test_more_distinct_texts_than_the_cache_holds_in_one_call(radclip_dir):
    """Report-level manifests have tens of thousands of distinct texts: a call must never lose its own."""
    from RadCLIPCore import load_model
    from RadCLIPCore.model import TEXT_CACHE_SIZE

    fresh = load_model(radclip_dir, device="cpu")
    texts = [f"finding number {i}" for i in range(TEXT_CACHE_SIZE + 200)]
    vectors = fresh.embed_texts(texts)
    assert vectors.shape == (len(texts), 64)
    for i in (0, 1, TEXT_CACHE_SIZE - 1, len(texts) - 1):  # the earliest ones were evicted from the cache
        np.testing.assert_allclose(vectors[i], fresh.embed_texts([texts[i]])[0], atol=1e-5)
    ranked = fresh.rank(np.asarray(vectors[3]), texts)
    assert len(ranked) == len(texts) and ranked[0].prompt == texts[3]


def test_a_model_that_computes_nan_is_an_error_not_a_result(radclip_dir, chest_ct):
    from RadCLIPCore import load_model

    broken = load_model(radclip_dir, device="cpu")
    with torch.no_grad():
        broken.clip.visual_projection.weight[0, 0] = float("nan")
    with pytest.raises(RadCLIPError, match="non-finite"):
        broken.embed_volume(chest_ct, max_slices=4)
    with pytest.raises(RadCLIPError, match="non-finite"):
        broken.rank(np.full(64, np.nan, np.float32), ["Chest CT", "Head CT"])


@pytest.mark.parametrize("kwargs", [{"batch_size": -1}, {"batch_size": 0}, {"batch_size": 2.5},
                                    {"max_slices": 0}, {"max_slices": "many"}])
def test_bad_batch_and_slice_counts(model, chest_ct, kwargs):
    with pytest.raises(RadCLIPError, match="at least 1"):
        model.embed_volume(chest_ct, **kwargs)


def test_text_embedding_ignores_padding(model):
    alone = model.embed_texts(["Brain MRI with pituitary tumor"])[0]
    model._texts.clear()
    batched = model.embed_texts(["Brain MRI with pituitary tumor", "a much longer prompt " * 5])[0]
    np.testing.assert_allclose(alone, batched, atol=1e-5)


def test_embed_image(model, ct_small, mr_small):
    ct = model.embed_image(ct_small)
    mr = model.embed_image(mr_small)
    assert ct.shape == (64,) and abs(np.linalg.norm(ct) - 1) < 1e-5
    assert not np.allclose(ct, mr)
    arr = read_volume(ct_small).array[0]
    np.testing.assert_allclose(model.embed_image(arr, spacing=(0.661468, 0.661468)), ct, atol=1e-5)
    with pytest.raises(RadCLIPError, match="embed_volume"):
        model.embed_image(np.zeros((3, 8, 8)))


@pytest.mark.parametrize("prompts,match", [([], "no prompts"), (["Chest CT", "  "], "prompt 2 is empty"),
                                           ([""], "empty"), (["ok", 3], "not text")])
def test_bad_prompts(model, prompts, match):
    with pytest.raises(RadCLIPError, match=match):
        model.rank(np.ones(64, np.float32) / 8, prompts)


def test_very_long_prompt_is_truncated_with_a_warning(model, caplog):
    long = "Chest CT with " + "a very large nodule in the right upper lobe and " * 20
    with caplog.at_level(logging.WARNING, logger="RadCLIPCore"):
        emb = model.embed_texts([long])
    assert emb.shape == (1, 64)
    assert any("truncated" in r.getMessage() for r in caplog.records)


def test_constant_volume_works(model):
    emb = model.embed_volume(np.zeros((6, 20, 20), np.int16))
    assert np.isfinite(emb.embedding).all() and abs(emb.slice_weights.sum() - 1) < 1e-5


def test_bad_volumes(model):
    with pytest.raises(RadCLIPError, match="1 voxel thick"):
        model.embed_volume(np.zeros((1, 20, 20)))
    with pytest.raises(RadCLIPError, match="empty"):
        model.embed_volume(np.zeros((0, 20, 20)))
    nan = np.zeros((4, 8, 8))
    nan[0, 0, 0] = np.nan
    with pytest.raises(RadCLIPError, match="NaN"):
        model.embed_volume(nan)
    with pytest.raises(RadCLIPError, match="spacing"):
        model.embed_volume(np.zeros((4, 8, 8)), spacing=(1, 0, 1))


def test_bf16_on_cpu_when_asked(radclip_dir, chest_ct, model):
    from RadCLIPCore import load_model

    bf16 = load_model(radclip_dir, device="cpu", precision="bf16")
    assert bf16.dtype == torch.bfloat16 and model.dtype == torch.float32
    a = bf16.embed_volume(chest_ct, max_slices=8).embedding
    b = model.embed_volume(chest_ct, max_slices=8).embedding
    assert a.dtype == np.float32 and float(a @ b) > 0.98


def test_prefetch_passes_errors_through_and_stops_early():
    import threading

    from RadCLIPCore.model import _prefetched

    def failing():
        yield 1
        raise ValueError("broken slice")

    with pytest.raises(ValueError, match="broken slice"):
        list(_prefetched(failing()))
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    gen = _prefetched(endless(), depth=2)
    assert [next(gen) for _ in range(3)] == [0, 1, 2]
    gen.close()  # the consumer stops: the producer thread must end, not block on a full queue
    assert not any(t.name == "radclip-preprocess" for t in threading.enumerate())
    assert len(produced) <= 3 + 2 + 1


def test_cached_results_cannot_be_edited_in_place(model, chest_ct):
    emb = model.embed_volume(chest_ct, max_slices=4)
    with pytest.raises(ValueError):
        emb.slice_weights[0] = 1.0
    assert model.embed_volume(chest_ct, max_slices=4) is emb


def test_slice_relevance_is_the_softmax_over_slices_of_each_prompt(mean_model, mni_small):
    """Per prompt, where along the volume it matches: exists for mean pooling too, never a flat veil."""
    volume = _volume(mni_small)
    emb = mean_model.embed_volume(volume)
    prompts = ["Brain MRI", "Chest CT"]
    rel = mean_model.slice_relevance(emb, prompts)
    assert rel.shape == (2, len(emb.slice_weights))
    np.testing.assert_allclose(rel.sum(axis=1), 1, atol=1e-5)
    cos = emb.slice_embeddings @ mean_model.embed_texts(prompts).T
    expected = torch.softmax(torch.from_numpy(cos).double() / mean_model.temperature, dim=0).numpy().T
    np.testing.assert_allclose(rel, expected, atol=1e-6)
    assert np.ptp(rel[0]) > 0 and np.ptp(emb.slice_weights) < 1e-6  # mean pooling: uniform weights
    sparse = mean_model.embed_volume(volume, max_slices=9)
    rel9 = mean_model.slice_relevance(sparse, prompts)
    assert rel9.shape == rel.shape and abs(rel9[0].sum() - 1) < 1e-5
    record = mean_model.ranking_record(sparse, prompts)
    assert [p["text"] for p in record["prompts"]] == [r.prompt for r in mean_model.rank(sparse, prompts)]
    assert all(len(p["relevance"]) == len(rel9[0]) for p in record["prompts"])
