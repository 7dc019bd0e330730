"""Header sizes are checked against what the file can hold before any reader allocates them (issue 9).

Each hostile file is tiny and declares gigabytes. It is read in a fresh Python process, which must
answer with one clear line naming the file and must not ask for the declared memory: neither its
peak resident size nor its peak address space (VmPeak, which also catches buffers allocated but
never touched) may grow by more than 1 GiB. Valid files, including very compressible ones, keep
opening.
"""
import gzip
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from RadCLIPCore import RadCLIPError, read_volume
from RadCLIPCore import header_checks
from RadCLIPCore import volume_io as rio

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30
BIG = b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2048 2048 1024\n"  # 4 GiB of voxels

_PROBE = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from RadCLIPCore.errors import RadCLIPError
from RadCLIPCore.{module} import {function} as read

def peaks():
    # this process's own peaks from /proc: getrusage's ru_maxrss starts at the launching process's
    # peak after fork + exec (a pytest that has trained models is over 1.5 GB)
    try:
        status = {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(("VmPeak", "VmHWM"))}
        return status["VmPeak"] * 1024, status["VmHWM"] * 1024
    except (OSError, KeyError, ValueError):
        return 0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

vm0, rss0 = peaks()
try:
    read(sys.argv[2])
    error = None
except RadCLIPError as exc:
    error = str(exc)
vm1, rss1 = peaks()
print(json.dumps(dict(error=error, vm=vm1 - vm0, rss=rss1 - rss0, peak_rss=rss1)))
"""


def _read_in_fresh_process(path, module="volume_io", function="read_volume"):
    code = _PROBE.replace("{module}", module).replace("{function}", function)
    run = subprocess.run([sys.executable, "-c", code, str(REPO), str(path)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, f"the reader crashed (rc {run.returncode}): {run.stderr[-2000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


def _assert_refused_cheaply(path, **kw):
    out = _read_in_fresh_process(path, **kw)
    msg = out["error"]
    assert msg is not None, f"{path.name} was read"
    assert "\n" not in msg and len(msg) < 400 and msg.startswith("cannot read") and path.name in msg, msg
    assert out["rss"] < GIB and out["peak_rss"] < 1.5 * GIB, f"{path.name}: resident memory grew {out['rss']:.3g} B"
    assert out["vm"] < GIB, f"{path.name}: address space grew by {out['vm'] / GIB:.1f} GiB ({msg})"
    return msg


def _nifti1(dims, datatype=2, bitpix=8, vox_offset=352.0):
    h = bytearray(352)
    struct.pack_into("<i", h, 0, 348)
    struct.pack_into("<8h", h, 40, len(dims), *dims, *[1] * (7 - len(dims)))
    struct.pack_into("<2h", h, 70, datatype, bitpix)
    struct.pack_into("<8f", h, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", h, 108, vox_offset)
    struct.pack_into("<f", h, 112, 1.0)  # scl_slope
    h[344:348] = b"n+1\0"
    return bytes(h)


def _png(width, height, idat):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _dicom_meta(syntax=b"1.2.840.10008.1.2.1\0"):
    element = struct.pack("<HH2sH", 2, 0x10, b"UI", len(syntax)) + syntax
    return b"\0" * 128 + b"DICM" + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(element)) + element


def _hostile_files(tmp: Path, ct_small: Path):
    """name -> path of a small file whose header declares far more voxel data than it holds."""
    import pydicom

    files = {}

    def put(name, data):
        (tmp / name).write_bytes(data)
        files[name] = tmp / name

    put("raw.nrrd", BIG + b"encoding: raw\n\n" + bytes(1000))
    put("gzip.nrrd", BIG + b"encoding: gzip\n\n" + gzip.compress(bytes(1000)))
    # 4.5 MB of incompressible gzip data: passes the 1032:1 bound for 4 GiB; only counting shows it is short
    put("long_gzip.nrrd", BIG + b"encoding: gzip\n\n" + gzip.compress(np.random.default_rng(0).bytes(4_500_000), 1))
    put("bzip2.nrrd", BIG + b"encoding: bzip2\n\n" + bytes(100))
    put("ascii.nrrd", BIG + b"encoding: ascii\n\n" + b"0 " * 500)
    put("small.raw", bytes(1000))
    put("detached.nhdr", BIG + b"encoding: raw\ndata file: small.raw\n\n")
    put("raw.nii", _nifti1((2048, 2048, 1024)) + bytes(1000))
    # the example: 32 GiB declared; gzip's size field (mod 2**32) matches the 352 bytes present
    put("wrapped.nii.gz", gzip.compress(_nifti1((2048, 2048, 2048), datatype=8, bitpix=32)))
    # 4 GiB + 4 MiB declared, 4 MiB of random voxels present: both the 1032:1 bound and the wrapped size
    # field (352 + 4 MiB) agree with the header; only counting the decompressed bytes shows the lie
    put("wrapped_long.nii.gz", gzip.compress(_nifti1((2048, 2048, 1025))
                                             + np.random.default_rng(1).bytes(4 << 20), 1))
    # not a size, but a header value ITK trusts: these sform rows make its NIfTI reader hang
    sform = bytearray(_nifti1((4, 4, 4)))
    struct.pack_into("<2h", sform, 252, 1, 1)  # qform_code, sform_code
    struct.pack_into("<12f", sform, 280, -1, 0, 0, 0, 0, -1, 0, -3e38, 1e-40, 0, float("inf"), 0)
    put("inf_sform.nii", bytes(sform) + bytes(64))
    meta = b"ObjectType = Image\nNDims = 3\nDimSize = 2048 2048 1024\nElementType = MET_UCHAR\n"
    put("local.mha", meta + b"ElementDataFile = LOCAL\n" + bytes(1000))
    put("compressed.mha", meta + b"CompressedData = True\nElementDataFile = LOCAL\n" + zlib.compress(bytes(1000)))
    put("separate.mhd", meta + b"ElementDataFile = small.raw\n")
    # ITK's MetaImage reader crashes the process on this header (and loops forever on NDims = -1)
    put("ndims.mha", b"ObjectType = Image\nNDims = 1e9\nElementSpacing = 1 1 1\nDimSize = 4 4 4\n"
        b"ElementType = MET_UCHAR\nElementDataFile = LOCAL\n" + bytes(64))
    # the reader allocates CompressedDataSize bytes (3 GB here) to read a 1 KB stream into
    put("stored_size.mha", meta.replace(b"2048 2048 1024", b"4 4 4") + b"CompressedData = True\n"
        b"CompressedDataSize = 3000000000\nElementDataFile = LOCAL\n" + zlib.compress(bytes(64)))
    # a zero size with a slice-file pattern: the reader divides by it (SIGFPE)
    put("zero_dim.mhd", meta.replace(b"2048 2048 1024", b"4 4 0") + b"ElementDataFile = small%d.raw 0 3 1\n")
    for k in range(4):
        put(f"small{k}.raw", bytes(16))
    ds = pydicom.dcmread(ct_small)
    ds.Rows = ds.Columns = 60000
    ds.save_as(tmp / "rows.dcm")
    files["rows.dcm"] = tmp / "rows.dcm"
    ds = pydicom.dcmread(ct_small)
    ds.NumberOfFrames = 200000
    ds.save_as(tmp / "frames.dcm")
    files["frames.dcm"] = tmp / "frames.dcm"
    # an element whose VR is not two letters sends GDCM down a path that allocates the next length (3 GB)
    put("element.dcm", _dicom_meta() + struct.pack("<HH2sHI", 2, 0x16, b"A9", 0, 0)
        + struct.pack("<HHI", 8, 5, 3_000_000_000) + b"x" * 100)
    put("huge.png", _png(60000, 60000, zlib.compress(bytes(600010))))
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp / "tiny.jpg")
    jpg = bytearray((tmp / "tiny.jpg").read_bytes())
    struct.pack_into(">HH", jpg, jpg.index(b"\xff\xc0") + 5, 60000, 60000)
    put("huge.jpg", bytes(jpg))
    return files


HOSTILE = ["raw.nrrd", "gzip.nrrd", "long_gzip.nrrd", "bzip2.nrrd", "ascii.nrrd", "detached.nhdr", "raw.nii",
           "inf_sform.nii", "wrapped.nii.gz", "wrapped_long.nii.gz", "local.mha", "compressed.mha", "separate.mhd",
           "ndims.mha", "stored_size.mha", "zero_dim.mhd",
           "rows.dcm", "frames.dcm", "element.dcm", "huge.png", "huge.jpg"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, ct_small):
    return _hostile_files(tmp_path_factory.mktemp("hostile"), ct_small)


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_header_refused_without_allocating(hostile, name):
    msg = _assert_refused_cheaply(hostile[name])
    if name not in ("bzip2.nrrd", "ndims.mha", "zero_dim.mhd", "inf_sform.nii"):
        assert "declares" in msg  # says what is wrong: the size the header declares


def test_hostile_dicom_series_first_file(tmp_path, ct_small):
    """ITK sizes a series from its first file: a first file declaring 60000 x 60000 pixels is refused."""
    import pydicom

    folder = tmp_path / "series"
    folder.mkdir()
    for k in range(3):
        ds = pydicom.dcmread(ct_small)
        ds.InstanceNumber, ds.ImagePositionPatient = k + 1, [0, 0, 5.0 * k]
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{k}"
        if k == 0:
            ds.Rows = ds.Columns = 60000
        ds.save_as(folder / f"s{k}.dcm")
    out = _read_in_fresh_process(folder)
    assert out["error"] and "s0.dcm" in out["error"] and "\n" not in out["error"], out
    assert out["rss"] < GIB and out["vm"] < GIB, out


def test_hostile_seg_nrrd(tmp_path):
    path = tmp_path / "mask.seg.nrrd"
    path.write_bytes(BIG + b"encoding: gzip\nSegment0_ID:=liver\nSegment0_Name:=liver\nSegment0_LabelValue:=1\n"
                     b"Segment0_Layer:=0\n\n" + gzip.compress(bytes(1000)))
    _assert_refused_cheaply(path, module="labelmaps", function="read_labelmap")


def test_bad_seg_nrrd_fields_are_one_line(tmp_path):
    from RadCLIPCore.labelmaps import read_labelmap

    path = tmp_path / "mask.seg.nrrd"
    path.write_bytes(b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\nencoding: raw\nSegment0_ID:=a\n"
                     b"Segment0_LabelValue:=one\n\n" + bytes(8))
    with pytest.raises(RadCLIPError, match="mask.seg.nrrd"):
        read_labelmap(path)


def test_more_than_memory_names_the_size(tmp_path, monkeypatch):
    monkeypatch.setattr(header_checks, "_physical_memory", lambda: 2 * GIB)
    path = tmp_path / "big.nrrd"
    path.write_bytes(BIG.replace(b"1024\n", b"2048\n") + b"encoding: raw\n\n" + bytes(10))
    with pytest.raises(RadCLIPError, match=r"8\.0 GiB.*memory \(2\.0 GiB\)"):
        read_volume(path)


# ---------------------------------------------------------------- valid files keep opening
def _zeros_and_ct(chest_ct, tmp: Path):
    """Files other readers open: written by SimpleITK from the real CT, plus very compressible ones."""
    ct = sitk.ReadImage(str(chest_ct))[100:228, 100:228, 50:60]
    zeros = sitk.Image([256, 256, 256], sitk.sitkUInt8)  # gzip holds these 16 MiB in ~16 KB (~1010:1)
    files = {}
    for name, image in [("ct.nrrd", ct), ("ct.mha", ct), ("ct.nhdr", ct), ("ct.mhd", ct), ("ct.nii", ct),
                        ("zeros.nrrd", zeros), ("zeros.mha", zeros), ("zeros.nii.gz", zeros), ("ctgz.nrrd", ct)]:
        sitk.WriteImage(image, str(tmp / name), useCompression=name.startswith(("zeros", "ctgz")))
        files[name] = (tmp / name, sitk.GetArrayFromImage(image))
    gray = sitk.GetArrayFromImage(ct)[5]
    png = ((gray - gray.min()) / np.ptp(gray) * 255).astype(np.uint8)
    Image.fromarray(png).save(tmp / "ct.png")
    Image.fromarray(np.zeros((4000, 4000), np.uint8)).save(tmp / "zeros.png")
    Image.fromarray(np.zeros((4000, 4000), np.uint8)).save(tmp / "zeros.jpg")
    files["ct.png"] = (tmp / "ct.png", png[None])
    files["zeros.png"] = (tmp / "zeros.png", np.zeros((1, 4000, 4000), np.uint8))
    files["zeros.jpg"] = (tmp / "zeros.jpg", np.zeros((1, 4000, 4000), np.uint8))
    # a .nii.gz of several gzip members (bgzip, pigz -i): the trailer holds only the last member's size
    raw = (tmp / "ct.nii").read_bytes()
    (tmp / "members.nii.gz").write_bytes(b"".join(gzip.compress(raw[i:i + 65536]) for i in range(0, len(raw), 65536)))
    files["members.nii.gz"] = (tmp / "members.nii.gz", files["ct.nii"][1])
    return files


@pytest.mark.parametrize("count_everything", [False, True], ids=["default", "decompress-and-count"])
def test_valid_files_keep_opening(chest_ct, mni, ct_small, mr_small, tmp_path, monkeypatch, count_everything):
    if count_everything:  # the path that large compressed files take, on small ones
        monkeypatch.setattr(header_checks, "_STREAM_CHECK_BYTES", 0)
    for name, (path, expected) in _zeros_and_ct(chest_ct, tmp_path).items():
        vol = read_volume(path)
        if name.endswith(".jpg"):
            assert vol.array.shape == expected.shape and vol.array.max() < 3, name
        else:
            np.testing.assert_array_equal(vol.array, expected, err_msg=name)
    assert read_volume(chest_ct).array.shape == (133, 512, 512)
    assert read_volume(mni).array.shape == (189, 233, 197)
    assert read_volume(ct_small).array.shape == (1, 128, 128)
    assert read_volume(mr_small).array.shape == (1, 64, 64)


def test_valid_pydicom_files_keep_opening():
    """Every DICOM file shipped with pydicom that SimpleITK reads (compressed ones included) still opens."""
    import pydicom

    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    readable = refused = 0
    for path in sorted(folder.glob("*.dcm")):
        try:
            with rio._native_output_captured():
                sitk.ReadImage(str(path))
        except RuntimeError:
            continue
        readable += 1
        try:
            read_volume(path)
        except RadCLIPError as exc:
            refused += "declares" in str(exc)
    assert readable > 20 and refused == 0
