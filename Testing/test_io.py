"""Reading real files in every supported format; bad files fail with one clear line."""
import gzip

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from RadCLIPCore import RadCLIPError, Volume, read_volume


def test_chest_ct_geometry(chest_ct):
    vol = read_volume(chest_ct)
    assert vol.array.shape == (133, 512, 512)  # (k, j, i)
    np.testing.assert_allclose(vol.spacing, (0.703125, 0.703125, 2.5))
    np.testing.assert_allclose(vol.direction, np.diag([1.0, -1.0, 1.0]))
    assert vol.array.min() < -900 and vol.array.max() > 1000  # Hounsfield units: air and bone


def test_mni_geometry(mni):
    vol = read_volume(mni)
    assert vol.array.shape == (189, 233, 197)
    np.testing.assert_allclose(vol.spacing, (1, 1, 1))
    np.testing.assert_allclose(vol.direction, np.diag([-1.0, -1.0, 1.0]))  # RAS on disk -> LPS direction


def test_single_dicom_files(ct_small, mr_small):
    ct = read_volume(ct_small)
    assert ct.array.shape == (1, 128, 128)
    np.testing.assert_allclose(ct.spacing[:2], (0.661468, 0.661468))
    assert read_volume(mr_small).array.shape == (1, 64, 64)


def _write_dicom_series(volume: sitk.Image, folder):
    """A real DICOM series (one file per slice, positions in the header), written by SimpleITK."""
    folder.mkdir()
    volume = sitk.Cast(volume, sitk.sitkInt16)
    direction = volume.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.123456789"
    for k in range(volume.GetDepth()):
        sl = volume[:, :, k]
        for tag, value in {
            "0008|0060": "MR", "0020|000e": series_uid, "0020|000d": series_uid + ".1",
            "0020|0037": "\\".join(map(str, (direction[0], direction[3], direction[6],
                                              direction[1], direction[4], direction[7]))),
            "0020|0032": "\\".join(map(str, volume.TransformIndexToPhysicalPoint((0, 0, k)))),
            "0020|0013": str(k + 1), "0018|0050": str(volume.GetSpacing()[2]),
        }.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_folder(mni, tmp_path):
    src = sitk.ReadImage(str(mni))[40:120, 50:150, 60:72]
    _write_dicom_series(src, tmp_path / "series")
    vol = read_volume(tmp_path / "series")
    assert vol.array.shape == (12, 100, 80)
    np.testing.assert_allclose(vol.spacing, (1, 1, 1), atol=1e-4)
    np.testing.assert_allclose(vol.direction, np.asarray(src.GetDirection()).reshape(3, 3), atol=1e-6)
    np.testing.assert_allclose(vol.origin, src.GetOrigin(), atol=1e-3)
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(src).astype(np.int16))


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii", ".nii.gz"])
def test_volume_formats_round_trip(chest_ct, tmp_path, suffix):
    src = sitk.ReadImage(str(chest_ct))[100:228, 100:228, 50:60]
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(src, str(path))
    vol = read_volume(path)
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(src))
    np.testing.assert_allclose(vol.spacing, src.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(vol.direction.ravel(), src.GetDirection(), atol=1e-6)


def test_png_and_jpeg_including_rgb(mni, tmp_path):
    sl = sitk.GetArrayFromImage(sitk.ReadImage(str(mni)))[90]
    gray = (255 * sl / sl.max()).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "slice.png")
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "rgb.jpg", quality=95)
    png = read_volume(tmp_path / "slice.png")
    assert png.array.shape == (1,) + gray.shape
    np.testing.assert_array_equal(png.array[0], gray)
    jpg = read_volume(tmp_path / "rgb.jpg")
    assert jpg.array.shape == (1,) + gray.shape  # RGB -> one luminance channel
    assert np.abs(jpg.array[0].astype(float) - gray).mean() < 3


def test_from_ijk_to_ras_matches_slicer_convention():
    # Slicer: IJK->RAS of an LPS-identity volume with spacing (0.5, 0.7, 2)
    m = np.diag([-0.5, -0.7, 2.0, 1.0])
    m[:3, 3] = (10, 20, 30)
    vol = Volume.from_ijk_to_ras(np.zeros((3, 4, 5)), m)
    np.testing.assert_allclose(vol.spacing, (0.5, 0.7, 2.0))
    np.testing.assert_allclose(vol.direction, np.eye(3))
    np.testing.assert_allclose(vol.origin, (-10, -20, 30))


# ---------------------------------------------------------------- bad files: one clear line each
def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and len(msg) < 400
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(RadCLIPError) as e:
        read_volume(tmp_path / "nope.nii.gz")
    assert "file not found" in _one_line(e)


def test_unsupported_extension(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(RadCLIPError) as e:
        read_volume(tmp_path / "notes.txt")
    assert "unsupported file type" in _one_line(e)


def test_corrupt_file(tmp_path):
    (tmp_path / "junk.nrrd").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(RadCLIPError) as e:
        read_volume(tmp_path / "junk.nrrd")
    assert "cannot read" in _one_line(e)


def test_truncated_file(chest_ct, tmp_path):
    data = chest_ct.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(RadCLIPError) as e:
        read_volume(tmp_path / "cut.nii.gz")
    assert "cannot read" in _one_line(e)


def test_truncated_uncompressed_nifti(chest_ct, tmp_path):
    data = gzip.decompress(chest_ct.read_bytes())
    (tmp_path / "cut.nii").write_bytes(data[: len(data) // 3])
    with pytest.raises(RadCLIPError) as e:
        read_volume(tmp_path / "cut.nii")
    assert "cannot read" in _one_line(e)


def test_4d_volume(tmp_path):
    frames = [sitk.GetImageFromArray(np.random.rand(4, 5, 6).astype(np.float32)) for _ in range(3)]
    sitk.WriteImage(sitk.JoinSeries(frames), str(tmp_path / "4d.nrrd"))
    with pytest.raises(RadCLIPError) as e:
        read_volume(tmp_path / "4d.nrrd")
    assert "4D" in _one_line(e)


def test_vector_volume(tmp_path):
    img = sitk.GetImageFromArray(np.random.rand(4, 5, 6, 3).astype(np.float32), isVector=True)
    sitk.WriteImage(img, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(RadCLIPError) as e:
        read_volume(tmp_path / "rgb.nrrd")
    assert "3 values per voxel" in _one_line(e)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RadCLIPError) as e:
        read_volume(tmp_path / "empty")
    assert "no DICOM series" in _one_line(e)


@pytest.mark.parametrize("array,match", [(np.zeros((0, 4, 4)), "empty"), (np.zeros((2, 2, 2, 2)), "3D array"),
                                         (np.array([["a"]]), "numeric")])
def test_bad_arrays(array, match):
    from RadCLIPCore.volume_io import as_volume
    from RadCLIPCore.preprocessing import check_volume_shape

    with pytest.raises(RadCLIPError, match=match):
        check_volume_shape(as_volume(array))


def test_a_grey_and_alpha_png_reads_as_its_grey_channel(tmp_path):
    """ITK has no pixel type for grey + alpha; common viewers open it: the alpha is dropped, as for RGBA."""
    from PIL import Image

    from RadCLIPCore import read_volume
    from RadCLIPCore.volume_io import read_image_info

    grey = (np.arange(600, dtype=np.uint8).reshape(20, 30) * 3) % 251
    Image.fromarray(np.dstack([grey, np.full_like(grey, 128)]), "LA").save(tmp_path / "la.png")
    Image.fromarray(grey, "L").save(tmp_path / "l.png")
    la, plain = read_volume(tmp_path / "la.png"), read_volume(tmp_path / "l.png")
    np.testing.assert_array_equal(la.array, plain.array)
    assert la.array.dtype == np.uint8 and read_image_info(tmp_path / "la.png").shape == (1, 20, 30)


def test_a_folder_of_non_image_files_is_one_line_without_itk_noise(tmp_path):
    """ITK's own multi-line `WARNING: In ...itkGDCMSeriesFileNames.cxx` must not reach the terminal."""
    import subprocess
    import sys

    from conftest import REPO

    for i in range(3):
        (tmp_path / f"note{i}.txt").write_text(f"not an image {i}")
    res = subprocess.run([sys.executable, "-m", "RadCLIPCore", "rank", str(tmp_path), "--prompt", "x"],
                         capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "no DICOM series" in lines[0], res.stderr
