"""Header checks before any pixel is read: what a file's header declares (size, pixel type, element
lengths) is compared with what the file can hold and with the machine's memory, for every format
we read. ITK allocates the whole pixel buffer from the header before it notices a lie, so a 1 KB
file declaring 4 GiB would otherwise cost 4 GiB; some forged headers crash or hang ITK outright.
`volume_io.read_volume` calls these; each raises a one-line `RadCLIPError` naming the file.
"""
from __future__ import annotations

import gzip
import math
import mmap
import os
import re
import struct
import zlib
from pathlib import Path

import SimpleITK as sitk

from .errors import RadCLIPError


def looks_like_dicom(path: Path) -> bool:
    """DICOM files are often named by UID (dots in the name, no suffix): check the magic bytes."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False



# Readers allocate the whole pixel buffer from the header's sizes before they read (and often zero-fill
# it), so a 1 KB file that declares 4 GiB costs 4 GiB before it fails. Every header is checked, before
# the pixel read, against the memory of the machine and against what its data can hold. Each bound
# is one that no valid file exceeds: the check may refuse only files no reader can read.
_DEFLATE_MAX_RATIO = 1032  # deflate codes at most 258 bytes per 2 bits (a 1-bit length and a 1-bit distance
#                            code); zeros measure 1028:1 with gzip -6 and -9
_RLE_MAX_RATIO = 64  # DICOM RLE (PackBits) codes at most 128 equal bytes in 2
_JPEG_PIXELS_PER_BYTE = 8192  # Huffman JPEG: >= 1 bit per 8x8 block in the DC scan, MCUs of <= 4x4 blocks
_STREAM_CHECK_BYTES = 256 << 20  # larger compressed data is decompressed (counted, not kept) before the read:
#                                  a forged size field or garbage of the right length can fool the bounds
_NATIVE_DICOM = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
_DICOM_RATIO = {**dict.fromkeys(_NATIVE_DICOM, 1), "1.2.840.10008.1.2.1.99": _DEFLATE_MAX_RATIO,
                "1.2.840.10008.1.2.5": _RLE_MAX_RATIO}  # JPEG-LS, JPEG 2000, video: no sound bound
_NIFTI_BYTES = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8,
                1536: 16, 1792: 16, 2048: 32, 2304: 4}  # datatype code -> bytes per voxel


def check_declared_size(path: Path, reader: sitk.ImageFileReader, io_name: str, copies: int = 1):
    """Refuse a file whose header (already read by `reader`) declares more voxel data than the
    machine's memory or than its data can hold, before any reader allocates it."""
    size = reader.GetSize()
    values = math.prod(size) * reader.GetNumberOfComponents()
    declared = values * sitk.Image(1, 1, reader.GetPixelID()).GetSizeOfPixelComponent()  # as ITK holds it
    memory = _physical_memory()
    if memory and declared * copies > memory:
        each = f" in each of {copies} files" if copies > 1 else ""
        raise RadCLIPError(f"cannot read '{path}': its header declares {' x '.join(map(str, size))} voxels{each} "
                           f"({_amount(declared * copies)}), more than this computer's memory ({_amount(memory)})")
    check = {"NrrdImageIO": _check_nrrd, "MetaImageIO": _check_meta, "NiftiImageIO": _check_nifti,
             "GDCMImageIO": _check_dicom, "PNGImageIO": _check_png, "JPEGImageIO": _check_jpeg}.get(io_name)
    if check is None:
        return  # another ITK reader: the memory ceiling above is the check
    try:
        check(path, reader, values, declared)
    except (OSError, EOFError, ValueError, IndexError, OverflowError, struct.error, zlib.error) as exc:
        raise RadCLIPError(f"cannot read '{path}': corrupt header or data ({exc})") from None


def _refuse(path, need, reason):
    raise RadCLIPError(f"cannot read '{path}': the header declares {_amount(need)} of voxel data, but {reason}")


def _amount(n) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _physical_memory():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # Windows has no sysconf
        pass
    try:
        import ctypes

        class Status(ctypes.Structure):  # MEMORYSTATUSEX
            _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong), ("total", ctypes.c_ulonglong),
                        ("rest", ctypes.c_ulonglong * 6)]

        status = Status(length=ctypes.sizeof(Status))
        return status.total if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)) else None
    except (AttributeError, OSError):
        return None


def _check_data(path, parts, kind, need, values=0, exact=False, blocks=None):
    """Raise unless the data in `parts` ((file, offset) pairs, in order) can hold `need` bytes (`values`
    numbers for text). kind: raw, hex, ascii, gzip (readers pass data without a gzip header through
    as raw) or deflate (zlib/gzip, always compressed). `exact`: count the decompressed bytes even when
    they are few; `blocks`: the compressed bytes when they are not the files' tails (PNG). `parts` may
    be a pattern's endless list: the files up to the first missing one count."""
    found = []
    for file, offset in parts:
        if not file.is_file():
            if not found:
                raise RadCLIPError(f"cannot read '{path}': its data file '{file}' is missing")
            break  # readers open only the files they need: a shortfall shows below
        found.append((file, offset))
    parts = found
    avail = sum(max(file.stat().st_size - offset, 0) for file, offset in parts)
    if kind == "gzip":
        with open(parts[0][0], "rb") as fh:
            fh.seek(parts[0][1])
            kind = "deflate" if fh.read(2) == b"\x1f\x8b" else "raw"
    if kind == "ascii" and values > (avail + 1) // 2:  # a digit and a separator per number, at least
        _refuse(path, need, f"its {avail} bytes of text hold at most {(avail + 1) // 2} numbers")
    if kind in ("raw", "hex") and need > (avail if kind == "raw" else avail // 2):
        where = ("the file holds" if parts[0][0] == path else "its data files hold" if len(parts) > 1
                 else "its data file holds")
        _refuse(path, need, f"{where} only {avail} bytes" + (" of hex digits" if kind == "hex" else ""))
    if kind == "deflate":
        if need > _DEFLATE_MAX_RATIO * avail:
            _refuse(path, need, f"{avail} bytes of compressed data hold at most {_amount(_DEFLATE_MAX_RATIO * avail)} "
                    f"(deflate compresses at most {_DEFLATE_MAX_RATIO}:1)")
        if exact or need > _STREAM_CHECK_BYTES:
            got = _inflated_size(blocks() if blocks else _file_blocks(parts), need)
            if got < need:
                _refuse(path, need, f"its compressed data holds only {got} bytes (truncated)")


def _file_blocks(parts):
    for file, offset in parts:
        with open(file, "rb") as fh:
            fh.seek(offset)
            while block := fh.read(1 << 20):
                yield block


def _inflated_size(blocks, limit):
    """How many bytes the zlib/gzip streams in `blocks` decompress to, counted up to `limit` in 1 MiB
    pieces that are not kept. Several gzip members (bgzip, one per data file) add up; trailing bytes
    after the first stream end the count."""
    total, stream, first = 0, zlib.decompressobj(47), True  # 47: zlib or gzip header
    try:
        for data in blocks:
            while data and total < limit:
                if stream.eof:
                    stream, first = zlib.decompressobj(47), False
                total += len(stream.decompress(data, 1 << 20))
                data = stream.unused_data if stream.eof else stream.unconsumed_tail
            if total >= limit:
                break
    except zlib.error:
        if first:
            raise
    return total


def _data_files(header: Path, spec: str, listed):
    """The data files a NRRD or MetaImage header names: one file, a LIST (names on the following lines)
    or 'format min max step [dim]' with a printf %d."""
    tokens = spec.split()
    pattern = re.fullmatch(r"([^%]*)%(0?)(\d{0,3})[di]([^%]*)", tokens[0]) if len(tokens) in (4, 5) else None
    if tokens[:1] == ["LIST"]:
        names = listed
    elif pattern and all(re.fullmatch(r"-?\d+", t) for t in tokens[1:4]):
        lo, hi, step = map(int, tokens[1:4])
        pre, zero, width, post = pattern.groups()
        names = (f"{pre}{i:{zero}{width}d}{post}" for i in range(lo, hi + (1 if step > 0 else -1), step or 1))
    else:
        names = [spec]
    return ((header.parent / name, 0) for name in names)  # lazily: _check_data stops at a missing file


def _check_nrrd(path, reader, values, need):
    fields, listed = {}, []
    with open(path, "rb") as fh:
        fh.readline(64)  # NRRD000x magic
        while line := fh.readline(1 << 20).rstrip(b"\r\n"):  # the header ends at a blank line
            text = line.decode("latin-1")
            if text.startswith("#") or ":=" in text:  # comments, key/value pairs
                continue
            key, _, value = text.partition(":")
            key, value = key.replace(" ", "").lower(), value.strip()
            fields[key] = value
            if key == "datafile" and value.split()[:1] == ["LIST"]:
                listed = [n.strip() for n in fh.read().decode("latin-1").splitlines() if n.strip()]
        offset = fh.tell()
    encoding = fields.get("encoding", "raw").lower()
    if encoding in ("bz2", "bzip2"):  # ITK's NRRD reader allocates the buffer, then says it has no bzip2
        raise RadCLIPError(f"cannot read '{path}': bzip2-encoded NRRD is not supported; "
                           "save it with gzip or raw encoding")
    kind = {"raw": "raw", "gz": "gzip", "gzip": "gzip", "hex": "hex", "txt": "ascii", "text": "ascii",
            "ascii": "ascii"}.get(encoding)
    if kind is None:
        return  # an unknown encoding fails while the header is parsed, before any allocation
    parts = _data_files(path, fields["datafile"], listed) if "datafile" in fields else [(path, offset)]
    skip = int(fields.get("lineskip", 0))  # lines before the data in each data file
    if skip > 0:
        parts = ((file, _after_lines(file, offset, skip)) for file, offset in parts)
    _check_data(path, parts, kind, need, values)  # byte skip only adds to what is needed: ignored


def _after_lines(file, offset, count):
    if not file.is_file():
        return offset
    with open(file, "rb") as fh:
        fh.seek(offset)
        for _ in range(count):
            if not fh.readline(1 << 20):
                break
        return fh.tell()


def _meta_header(path):
    """MetaImage header fields (lower-case keys), the LIST of data files if any, and the data offset."""
    fields, listed = {}, []
    with open(path, "rb") as fh:
        while line := fh.readline(1 << 20):  # ElementDataFile is the last header line
            key, _, value = line.decode("latin-1").partition("=")
            fields[key.strip().lower()] = value.strip()
            if key.strip().lower() == "elementdatafile":
                break
        if fields.get("elementdatafile", "").split()[:1] == ["LIST"]:
            listed = [n.strip() for n in fh.read().decode("latin-1").splitlines() if n.strip()]
        return fields, listed, fh.tell()


def check_meta_header(path):
    """ITK's MetaImage reader crashes the process on an NDims of 1e9 (and loops forever on -1) and
    divides by a zero DimSize: check those before that reader sees the file."""
    try:
        fields = _meta_header(path)[0]
    except OSError:
        return
    ndims, sizes = fields.get("ndims"), fields.get("dimsize", "").split()
    # the reader parses numbers with atof ("1e9", "inf" and "-1" all pass): accept only 1 to 10
    if ndims is not None and not re.fullmatch(r"0*([1-9]|10)(\.0*)?", ndims):
        raise RadCLIPError(f"cannot read '{path}': NDims = {ndims[:20]} in its header "
                           "(MetaImage has 1 to 10 dimensions)")
    if any(re.match(r"\s*(-|0*(\.0*)?$)", size) for size in sizes):
        raise RadCLIPError(f"cannot read '{path}': DimSize = {' '.join(sizes)[:60]} in its header "
                           "(sizes must be positive)")


def _check_meta(path, reader, values, need):
    fields, listed, offset = _meta_header(path)
    spec = fields.get("elementdatafile", "")
    if not spec:
        return
    kind = ("deflate" if fields.get("compresseddata", "").lower() == "true"
            else "ascii" if fields.get("binarydata", "true").lower() == "false" else "raw")
    single = path if spec.upper() == "LOCAL" else path.parent / spec
    stored = re.match(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", fields.get("compresseddatasize", ""))  # as atof
    if kind == "deflate" and single.is_file() and stored and not 0 <= float(stored[0]) <= single.stat().st_size:
        # the reader allocates CompressedDataSize bytes (a negative one wraps to 2**64) for the stream
        raise RadCLIPError(f"cannot read '{path}': its header declares {stored[0].strip()} bytes of compressed data, "
                           f"but the file holds {single.stat().st_size}")
    parts = [(path, offset)] if spec.upper() == "LOCAL" else _data_files(path, spec, listed)
    _check_data(path, parts, kind, need, values)  # HeaderSize only adds to what is needed: ignored


def _check_nifti(path, reader, values, need):
    gz, header = _nifti_header(path)
    end = _nifti_data_end(header)
    if end is None:
        return  # not a header we know: let the reader decide
    if gz:  # NIfTI readers zero-fill a truncated file silently, so even small data is checked: the gzip
        with open(path, "rb") as fh:  # trailer holds the size mod 2**32 (a size that wraps, or a forged
            fh.seek(-4, os.SEEK_END)  # trailer, matches it: larger data is counted whatever it says)
            isize = struct.unpack("<I", fh.read(4))[0]
        _check_data(path, [(path, 0)], "deflate", end, exact=isize != end % 2**32)
    else:
        _check_data(path, [(path, 0)], "raw", end)


def _nifti_header(path):
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"  # NIfTI's gzip reader passes an uncompressed .nii.gz through
    with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
        return gz, fh.read(540)


def check_nifti_geometry(path):
    """ITK's NIfTI reader hangs on some non-finite sform/qform values (inf and NaN in the rows): refuse
    them before it reads the header. Unused transforms (code 0) may hold anything."""
    try:
        header = _nifti_header(path)[1]
    except (OSError, EOFError, zlib.error):
        return  # the size check reports it
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            qcode, scode = struct.unpack(endian + "2h", header[252:256])
            used = (struct.unpack(endian + "6f", header[256:280]) + struct.unpack(endian + "3f", header[80:92])
                    if qcode > 0 else ()) + (struct.unpack(endian + "12f", header[280:328]) if scode > 0 else ())
            if not all(math.isfinite(v) for v in used):
                raise RadCLIPError(f"cannot read '{path}': its header's orientation (qform/sform) holds inf or NaN")


def _nifti_data_end(header: bytes):
    """Offset of the end of the voxel data, from a NIfTI-1 or NIfTI-2 header (None if unknown)."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            offset = struct.unpack(endian + "f", header[108:112])[0]
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    ndim = dims[0]
    nbytes = _NIFTI_BYTES.get(datatype, bitpix / 8)  # readers size voxels by datatype, not bitpix
    if not 1 <= ndim <= 7 or nbytes <= 0:
        return None
    offset = int(offset) if math.isfinite(offset) and offset > 0 else 0  # smaller offsets only ask for less
    return offset + int(math.prod(max(d, 1) for d in dims[1:ndim + 1]) * nbytes)


def _check_dicom(path, reader, values, need):
    bits = int(reader.GetMetaData("0028|0100")) if reader.HasMetaDataKey("0028|0100") else 1
    need = math.prod(reader.GetSize()) * bits // 8  # one sample per pixel: palette, YBR_422 store < ITK gives
    ratio = _DICOM_RATIO.get(_dicom_transfer_syntax(path))
    avail = path.stat().st_size
    if ratio and need > ratio * avail:
        _refuse(path, need, f"the file holds only {avail} bytes" if ratio == 1 else
                f"{avail} bytes of compressed data hold at most {_amount(ratio * avail)}")


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def check_dicom_elements(path: Path):
    """GDCM parses any file the other readers decline (and every file of a series folder) and, on some
    recovery paths (an element whose VR is not two letters), allocates an element's declared length
    without comparing it with the file: 1.5 GB for a 300-byte file. Walk the elements first, as GDCM
    would (explicit VR switching to implicit at a bad VR), and refuse a length past the end of the file.
    Sequences and encapsulated pixel data of undefined length are walked through in place: their items
    and delimiters are elements too; items of known length are skipped whole."""
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
            _walk_dicom(path, m)
    except (OSError, ValueError, struct.error):
        return  # unreadable or cut inside an element header: GDCM's own error will say so


def _walk_dicom(path, m):
    syntax = _dicom_transfer_syntax(path) or _NATIVE_DICOM[1]
    pos, size, explicit, endian, meta = 132, len(m), True, "<", True
    while pos + 8 <= size:
        group, element = struct.unpack_from(endian + "HH", m, pos)
        if meta and group != 2:  # the data set after the file meta group (always explicit little endian)
            if syntax == "1.2.840.10008.1.2.1.99":
                return  # deflated: not walked
            meta, explicit, endian = False, syntax != _NATIVE_DICOM[0], ">" if syntax == _NATIVE_DICOM[2] else "<"
            continue
        vr = bytes(m[pos + 4:pos + 6])
        if group == 0xFFFE:  # item or delimiter: no VR, 4-byte length
            length, pos = struct.unpack_from(endian + "I", m, pos + 4)[0], pos + 8
            if element != 0xE000:
                continue
        elif explicit and vr.isalpha() and vr.isupper():
            long = vr in _LONG_VRS
            length = struct.unpack_from(endian + ("I" if long else "H"), m, pos + (8 if long else 6))[0]
            pos += 12 if long else 8
        else:
            explicit = False
            length, pos = struct.unpack_from(endian + "I", m, pos + 4)[0], pos + 8
        if length == 0xFFFFFFFF:
            continue  # undefined length: the contents follow
        if length > size - pos:
            raise RadCLIPError(f"cannot read '{path}': element ({group:04X},{element:04X}) declares {_amount(length)}, "
                               "past the end of the file")
        pos += length


def _dicom_transfer_syntax(path):
    """(0002,0010) from the file meta group (always explicit VR little endian); None if not found."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    if head[128:132] != b"DICM":
        return _NATIVE_DICOM[0]  # a bare data set: implicit VR little endian
    pos = 132
    while pos + 8 <= len(head) and struct.unpack_from("<H", head, pos)[0] == 2:
        element, vr = struct.unpack_from("<H", head, pos + 2)[0], head[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            length, pos = struct.unpack_from("<I", head, pos + 8)[0], pos + 12
        else:
            length, pos = struct.unpack_from("<H", head, pos + 6)[0], pos + 8
        if element == 0x10:
            return head[pos:pos + length].decode("latin-1").strip("\0 ")
        pos += length
    return None


def _check_png(path, reader, values, need):
    with open(path, "rb") as fh:
        width, height, depth, color = struct.unpack(">IIBB", fh.read(26)[16:26])
    channels = {2: 3, 4: 2, 6: 4}.get(color, 1)  # grey and palette: 1
    need = width * height * channels * depth // 8  # the pixel bits alone: a bound for interlaced files too
    _check_data(path, [(path, 33)], "deflate", need, blocks=lambda: _png_idat(path))


def _png_idat(path):
    with open(path, "rb") as fh:
        fh.seek(8)
        while len(head := fh.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IEND":
                return
            if kind != b"IDAT":
                fh.seek(length + 4, os.SEEK_CUR)
                continue
            while length > 0 and (block := fh.read(min(length, 1 << 20))):
                length -= len(block)
                yield block
            fh.seek(4, os.SEEK_CUR)  # CRC


def _check_jpeg(path, reader, values, need):
    with open(path, "rb") as fh:
        fh.read(2)  # SOI
        while True:
            marker = fh.read(2)
            while marker == b"\xff\xff":  # fill bytes
                marker = b"\xff" + fh.read(1)
            head = fh.read(7)
            if len(marker) < 2 or marker[0] != 0xFF or len(head) < 7:
                return  # what libjpeg tolerates (stray bytes before a marker) is not second-guessed here
            if marker[1] in (0xC0, 0xC1, 0xC2, 0xC3):  # Huffman-coded frame (arithmetic: no bound)
                height, width = struct.unpack(">3xHH", head)
                break
            if marker[1] in (0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xDA):
                return  # hierarchical or arithmetic-coded frame, or no frame header before the scan
            fh.seek(struct.unpack(">H", head[:2])[0] - 7, os.SEEK_CUR)  # past this segment
    avail = path.stat().st_size
    if width * height > _JPEG_PIXELS_PER_BYTE * avail:
        _refuse(path, need, f"a {width} x {height} JPEG takes at least {width * height // _JPEG_PIXELS_PER_BYTE} "
                f"bytes (1 bit per 8 x 8 block) and the file has {avail}")
