"""Canonical orientation, plane choice, intensities and batched resizing on real volumes."""
import itertools

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from RadCLIPCore import PreprocessConfig, RadCLIPError, Volume, read_volume
from RadCLIPCore.intensity import VolumeStats, volume_stats
from RadCLIPCore.preprocessing import (canonicalize, choose_plane, evenly_spaced, prepare_volume,
                                       slices_to_pixels)


def _volume(image: sitk.Image) -> Volume:
    return Volume(sitk.GetArrayFromImage(image), image.GetSpacing(), np.reshape(image.GetDirection(), (3, 3)),
                  image.GetOrigin())


@pytest.fixture(scope="module")
def mni_image(mni):
    return sitk.ReadImage(str(mni))[::2, ::2, ::2]


def test_canonical_array_equals_simpleitk_lps_reorientation(mni_image, chest_ct):
    for image in (mni_image, sitk.ReadImage(str(chest_ct))[::4, ::4, ::2]):
        canon = canonicalize(_volume(image))
        expected = sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))
        np.testing.assert_array_equal(canon.array, expected)


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_permuted_and_flipped_copies_have_the_same_canonical_array(mni_image, order):
    reference = canonicalize(_volume(mni_image))
    for flips in ([False, False, False], [True, False, True], [False, True, False]):
        copy = sitk.Flip(sitk.PermuteAxes(mni_image, list(order)), flips)  # direction updated to match
        canon = canonicalize(_volume(copy))
        np.testing.assert_array_equal(canon.array, reference.array)
        assert canon.spacing == reference.spacing


def test_canonical_is_a_view_not_a_copy(chest_ct):
    vol = read_volume(chest_ct)
    assert np.shares_memory(canonicalize(vol).array, vol.array)


def test_plane_auto_picks_the_acquisition_plane(chest_ct, mni):
    assert prepare_volume(read_volume(chest_ct)).plane == "axial"  # 2.5 mm slices
    assert prepare_volume(read_volume(mni)).plane == "axial"  # isotropic: axial
    sagittal = Volume.from_array(np.random.rand(20, 30, 8), spacing=(4.0, 1.0, 1.0))  # coarse along i (L-R)
    assert prepare_volume(sagittal).plane == "sagittal"
    coronal = Volume.from_array(np.random.rand(20, 8, 30), spacing=(1.0, 3.0, 1.0))
    assert prepare_volume(coronal).plane == "coronal"
    assert choose_plane((1, 1, 1), "coronal") == "coronal"
    with pytest.raises(RadCLIPError, match="unknown plane"):
        choose_plane((1, 1, 1), "oblique")


def test_slices_in_display_convention(mni):
    """Axial: anterior at the top; coronal/sagittal: superior at the top (head above neck)."""
    prepared = prepare_volume(read_volume(mni), "coronal")
    coronal = prepared.slices([prepared.n_slices // 2])[0].astype(float)
    rows = coronal.shape[0]
    assert coronal[: rows // 3].mean() > coronal[-rows // 6:].mean()  # brain above, little at the bottom edge
    sag = prepare_volume(read_volume(mni), "sagittal")
    assert sag.slices([sag.n_slices // 2]).shape[1:] == (189, 233)  # (S, P)


def test_zscore_statistics_stream_without_a_float64_copy(chest_ct):
    vol = read_volume(chest_ct)
    stats = volume_stats(vol.array, PreprocessConfig())
    mean, std = stats.mean, stats.std
    np.testing.assert_allclose([mean, std], [vol.array.mean(dtype=np.float64), vol.array.std(dtype=np.float64)],
                               rtol=1e-6)


def test_constant_volume_works_and_is_finite():
    prepared = prepare_volume(Volume.from_array(np.full((5, 16, 16), 7.0)))
    pixels = next(prepared.pixel_batches(8))
    assert torch.isfinite(pixels).all()
    assert prepared.stats.std == 0


def test_nan_and_inf_are_errors():
    arr = np.zeros((4, 8, 8), np.float32)
    arr[1, 2, 3] = np.nan
    with pytest.raises(RadCLIPError, match="NaN"):
        prepare_volume(Volume.from_array(arr))
    arr[1, 2, 3] = np.inf
    with pytest.raises(RadCLIPError, match="NaN or infinite"):
        prepare_volume(Volume.from_array(arr))


def test_one_voxel_thick_volume_is_an_error():
    with pytest.raises(RadCLIPError, match="1 voxel thick"):
        prepare_volume(Volume.from_array(np.zeros((1, 8, 8))))


def test_batched_resize_equals_one_slice_at_a_time(chest_ct):
    prepared = prepare_volume(read_volume(chest_ct), max_slices=12)
    batched = next(prepared.pixel_batches(12))
    one_by_one = torch.cat([slices_to_pixels(prepared.slices([c]), prepared.stats, prepared.pixel_spacing,
                                             prepared.config) for c in prepared.sampled])
    assert batched.shape == (12, 3, 224, 224)
    torch.testing.assert_close(batched, one_by_one)


def test_physical_aspect_ratio_is_kept_and_padded_black():
    cfg = PreprocessConfig(image_size=64)
    # 40 x 40 pixels of 2 mm x 1 mm: 80 mm tall, 40 mm wide -> 64 x 32 content, black bars left/right
    out = slices_to_pixels(np.ones((1, 40, 40)) * np.arange(40)[None, :, None], VolumeStats(20.0, 11.0, 0.0), (2.0, 1.0), cfg)
    unnormalised = out[0, 0] * cfg.std[0] + cfg.mean[0]
    cols_with_content = (unnormalised > 1e-6).any(dim=0).nonzero().flatten()
    assert cols_with_content.min() == 16 and cols_with_content.max() == 47  # 32 columns, centred
    assert torch.allclose(unnormalised[:, :16], torch.zeros(()), atol=1e-6)


def test_three_channels_with_clip_mean_and_std():
    cfg = PreprocessConfig(image_size=32)
    out = slices_to_pixels(np.zeros((2, 32, 32)), VolumeStats(0.0, 1.0, 0.0), (1.0, 1.0), cfg)  # z = 0 -> 0.5 grey
    expected = (0.5 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    torch.testing.assert_close(out[0, :, 5, 5], expected.float())


def test_evenly_spaced_subsampling_and_mapping_back(chest_ct):
    np.testing.assert_array_equal(evenly_spaced(10, 4), [0, 3, 6, 9])
    np.testing.assert_array_equal(evenly_spaced(5, 50), np.arange(5))
    with pytest.raises(RadCLIPError, match="max_slices"):
        evenly_spaced(10, 0)
    prepared = prepare_volume(read_volume(chest_ct), max_slices=8)
    full = prepared.to_input_order(np.linspace(1, 2, len(prepared.sampled)))
    assert full.shape == (133,)
    assert abs(full.sum() - 1) < 1e-5
    assert np.all(np.diff(full) > 0)  # linear interpolation between the sampled slices


def test_mapping_back_follows_a_flipped_slice_axis(mni_image):
    flipped = sitk.Flip(mni_image, [False, False, True])  # k reversed, direction updated
    a, b = prepare_volume(_volume(mni_image)), prepare_volume(_volume(flipped))
    weights = np.arange(1, a.n_slices + 1, dtype=float)
    np.testing.assert_allclose(b.to_input_order(weights), a.to_input_order(weights)[::-1])


def test_preprocess_config_round_trips():
    cfg = PreprocessConfig(image_size=96, zscore_clip=2.5)
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(RadCLIPError, match="unknown preprocessing"):
        PreprocessConfig.from_dict({"image_size": 3, "gamma": 2})


@pytest.mark.parametrize("windows", [[(0.0, 1e39)], [(0.0, 1e30)], [(1e30, 400.0)], [(40.0, -1.0)]])
def test_a_window_float32_cannot_represent_or_no_scanner_needs_is_refused(windows):
    """--windows=0/1e39 used to become inf in float32 and write all-black PNGs with exit 0."""
    from RadCLIPCore.preprocessing import ConfigError, PreprocessConfig

    with pytest.raises(ConfigError, match="windows"):
        PreprocessConfig(intensity="ct-window", windows=windows)


def test_numbers_beyond_float32_are_refused_everywhere_in_the_policy():
    from RadCLIPCore.preprocessing import ConfigError, PreprocessConfig

    with pytest.raises(ConfigError, match="zscore_clip"):
        PreprocessConfig(zscore_clip=1e39)
    with pytest.raises(ConfigError, match="std"):
        PreprocessConfig(std=(1e39, 1.0, 1.0))
