"""Read ImageNet's downloads in place: image-net.org's two tars and devkit, or Kaggle's zip, never extracted.

- `ILSVRC2012_img_train.tar`: one inner tar per class (`n01440764.tar`), each holding that class's JPEGs;
- `ILSVRC2012_img_val.tar`: the 50,000 validation JPEGs, flat;
- `ILSVRC2012_devkit_t12.tar.gz`: `data/meta.mat` (ILSVRC2012_ID -> WNID; the classes are the synsets without
  children) and `data/ILSVRC2012_validation_ground_truth.txt` (one id per validation image, in file order);
- `imagenet-object-localization-challenge.zip` (Kaggle): `ILSVRC/Data/CLS-LOC/{train/<wnid>,val}/` and
  `LOC_val_solution.csv`.

A tar is indexed once by reading its headers only (the offset and size of every member, inner tars included) into a
journal that a killed scan continues from; a zip's central directory is its index. Workers then read an image by
its offset. A damaged archive is refused in one line that names it and the byte offset.
"""

from __future__ import annotations

import errno
import io
import struct
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from tarfile import TarInfo
from typing import BinaryIO

from tqdm import tqdm

from data_prep.journal import Journal

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
OFFICIAL = (TRAIN_TAR, VAL_TAR, DEVKIT)
KAGGLE_ZIP = "imagenet-object-localization-challenge.zip"
# Where Kaggle's zip holds the classification images (train/<wnid>/, val/).
KAGGLE_DATA = "ILSVRC/Data/CLS-LOC/"
META = "data/meta.mat"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
BLOCK = tarfile.BLOCKSIZE
# Members of a flat tar journaled per line of the index (one fsync each).
INDEX_BATCH = 4096
# A zip member's local header: signature, 5 shorts, CRC and two sizes, name and extra-field lengths.
ZIP_LOCAL_HEADER = struct.Struct("<4s5H3L2H")


class ArchiveError(ValueError):
    """An archive cannot be read as the one its publisher hands out; the message names it, the offset and the fix."""


@dataclass(frozen=True, slots=True)
class Member:
    """Where one file's bytes lie in an archive: a tar member's data, or a zip member's local header."""

    archive: str
    offset: int
    size: int
    # Zip members only: the compression method (0 stored, 8 deflated) and the CRC-32 of the uncompressed bytes.
    method: int | None = None
    crc: int | None = None


@dataclass(frozen=True)
class Devkit:
    """What the validation split needs from the devkit."""

    # ILSVRC2012_ID -> WNID of the leaf synsets (num_children == 0): the classes.
    classes: dict[int, str]
    # One ILSVRC2012_ID per validation image, in file order.
    ground_truth: list[int]


def found(root: Path) -> list[str]:
    """The names of the archives of either download that lie in `root`."""
    return [name for name in (*OFFICIAL, KAGGLE_ZIP) if (root / name).is_file()]


# ---------------------------------------------------------------- reading by offset


def read_member(f: BinaryIO, member: Member) -> bytes:
    """A member's bytes, read by offset from the open archive (a zip member's are inflated and CRC-checked)."""
    f.seek(member.offset)
    if member.method is None:
        return _read_exactly(f, member.size, member)
    signature, *_, name_length, extra_length = ZIP_LOCAL_HEADER.unpack(_read_exactly(f, ZIP_LOCAL_HEADER.size, member))
    if signature != b"PK\x03\x04":
        raise OSError(errno.EIO, f"no zip local header at byte {member.offset}")
    f.seek(member.offset + ZIP_LOCAL_HEADER.size + name_length + extra_length)
    data = _read_exactly(f, member.size, member)
    try:
        data = zlib.decompress(data, -zlib.MAX_WBITS) if member.method == zipfile.ZIP_DEFLATED else data
    except zlib.error as e:
        raise OSError(errno.EIO, f"corrupt deflate data at byte {member.offset}: {e}") from e
    if zlib.crc32(data) != member.crc:
        raise OSError(errno.EIO, f"CRC-32 mismatch at byte {member.offset}")
    return data


def _read_exactly(f: BinaryIO, size: int, member: Member) -> bytes:
    """`size` bytes from the current position; fewer means the archive was cut short since it was indexed."""
    data = f.read(size)
    if len(data) != size:
        raise OSError(errno.EIO, f"archive ends before byte {member.offset + size}; truncated since it was indexed")
    return data


class _Window(io.RawIOBase):
    """A read-only view of `length` bytes of an open file from `start`: an inner tar inside the outer one."""

    def __init__(self, f: BinaryIO, start: int, length: int):
        self.f, self.start, self.length, self.position = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        self.position = base + offset
        return self.position

    def readinto(self, buffer) -> int:
        self.f.seek(self.start + self.position)
        data = self.f.read(max(0, min(len(buffer), self.length - self.position)))
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


# ---------------------------------------------------------------- the tar index


def index_tar(path: Path, journal_path: Path, nested: bool) -> dict[str, list[tuple[str, Member]]]:
    """Every member of a tar by offset, grouped by inner tar when `nested` ("" holds the outer files).

    The index is journaled at `journal_path`: a scan killed part-way continues after the last inner tar (or batch)
    it recorded, and a finished index is read back without touching the archive again."""
    stat = path.stat()
    header = {"archive": path.name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "nested": nested}
    journal_path.parent.mkdir(parents=True, exist_ok=True)
    journal = Journal(journal_path)
    if journal.entries[:1] != [header]:
        # Another archive (or none) was indexed here: start over.
        journal_path.unlink()
        journal = Journal(journal_path)
        journal.append(header)
    done = journal.entries[1:]
    if not (done and done[-1].get("end")):
        _scan(path, journal, done[-1]["next"] if done else 0, stat.st_size, nested)
    return _listing(path, journal.entries[1:])


def _scan(path: Path, journal: Journal, start: int, size: int, nested: bool) -> None:
    """Read the tar's headers from byte `start` on, journaling its members (and each inner tar's) as they come."""
    batch: list[list] = []
    with (
        open(path, "rb") as f,
        open(path, "rb") as g,
        tqdm(total=size, initial=start, desc=f"index {path.name}", unit="B", unit_scale=True, file=sys.stderr) as bar,
    ):
        f.seek(start)
        for info in _checked_members(f, path, "", start, 0, size):
            following = info.offset_data + -(-info.size // BLOCK) * BLOCK
            if nested and info.isfile() and info.name.endswith(".tar"):
                members = _inner_members(path, g, info)
                journal.append({"tar": _name(info), "next": following, "members": members})
            elif info.isfile():
                batch.append([_name(info), info.offset_data, info.size])
            if len(batch) == INDEX_BATCH:
                journal.append({"tar": "", "next": following, "members": batch})
                batch = []
            bar.update(following - bar.n)
        journal.append({"tar": "", "next": f.tell(), "members": batch, "end": True})
        bar.update(size - bar.n)


def _inner_members(path: Path, g: BinaryIO, outer: tarfile.TarInfo) -> list[list]:
    """[name, offset in the outer file, size] of every file in one inner tar, read through a window on it."""
    base = outer.offset_data
    window = _Window(g, base, outer.size)
    members = _checked_members(window, path, outer.name, 0, base, outer.size)  # type: ignore[arg-type]
    return [[_name(info), base + info.offset_data, info.size] for info in members if info.isfile()]


def _checked_members(f: BinaryIO, path: Path, inner: str, start: int, base: int, size: int) -> Iterator[TarInfo]:
    """The members of the tar (the outer one, or `inner` at byte `base` of it) read from byte `start` of `f`, each
    checked to lie within the tar's `size` bytes, and the tar checked to end in its end-of-archive block.
    On return, `f` stands at that block."""
    what = f"inner tar {inner}" if inner else "the archive"
    where = f"{path}: inner tar {inner}" if inner else str(path)
    try:
        tar = tarfile.open(fileobj=f, mode="r:")
    except tarfile.TarError as e:
        raise ArchiveError(f"{where}: not a tar at byte {base + start} ({e}); download {path.name} again") from e
    try:
        for info in tar:
            if info.offset_data + info.size > size:
                raise ArchiveError(
                    f"{path}: truncated: {info.name} at byte {base + info.offset_data} needs {info.size} bytes, but "
                    f"{what} ends at byte {base + size}; download {path.name} again"
                )
            yield info
    except tarfile.TarError as e:
        raise ArchiveError(f"{where}: unreadable at byte {base + tar.offset} ({e}); download {path.name} again") from e
    f.seek(tar.offset)
    if f.read(BLOCK) != bytes(BLOCK):
        raise ArchiveError(
            f"{path}: truncated or damaged at byte {base + tar.offset}: {what} has neither a member header nor its "
            f"end there; download {path.name} again"
        )
    f.seek(tar.offset)


def _name(info: tarfile.TarInfo) -> str:
    """A member's name as extraction places it (`./a.JPEG` is `a.JPEG`)."""
    return info.name.removeprefix("./")


def _listing(path: Path, entries: list[dict]) -> dict[str, list[tuple[str, Member]]]:
    """The journaled index as {inner tar name or "": [(member name, Member)]}, refusing names seen twice."""
    groups: dict[str, list[tuple[str, Member]]] = {}
    archive = str(path)
    for entry in entries:
        if entry["tar"] and entry["tar"] in groups:
            raise ArchiveError(f"{path}: {entry['tar']} appears twice; download {path.name} again")
        if entry["tar"] or entry["members"]:
            members = groups.setdefault(entry["tar"], [])
            members += [(name, Member(archive, offset, size)) for name, offset, size in entry["members"]]
    for group, members in groups.items():
        _refuse_twice(path, group, members)
    return groups


def _refuse_twice(path: Path, group: str, members: list[tuple[str, Member]]) -> None:
    """Refuse a name that appears twice in one tar: an extraction would keep only the last."""
    seen: dict[str, Member] = {}
    for name, member in members:
        if name in seen:
            where = f"inner tar {group}" if group else path.name
            raise ArchiveError(
                f"{path}: {name} appears twice in {where} (bytes {seen[name].offset} and {member.offset}); "
                f"download {path.name} again"
            )
        seen[name] = member


# ---------------------------------------------------------------- the devkit and the zip


def read_devkit(path: Path) -> Devkit:
    """The classes (from meta.mat) and the validation ground truth of ILSVRC2012_devkit_t12.tar.gz."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            files = {m.name: m for m in tar.getmembers() if m.isfile()}
            meta = _devkit_file(tar, files, path, META)
            truth = _devkit_file(tar, files, path, GROUND_TRUTH)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ArchiveError(f"{path}: not a readable tar.gz ({e}); download {DEVKIT} again") from e
    return Devkit(_leaf_synsets(path, meta), _ground_truth(path, truth))


def _devkit_file(tar: tarfile.TarFile, files: dict, path: Path, name: str) -> bytes:
    """One file of the devkit, found under its top folder (ILSVRC2012_devkit_t12/)."""
    matches = sorted(n for n in files if n == name or n.endswith("/" + name))
    if not matches:
        raise ArchiveError(f"{path}: has no {name}; use {DEVKIT}, the ILSVRC2012 development kit from image-net.org")
    return tar.extractfile(files[matches[0]]).read()


def _leaf_synsets(path: Path, data: bytes) -> dict[int, str]:
    """{ILSVRC2012_ID: WNID} of the synsets without children in meta.mat's struct array `synsets`."""
    import numpy as np

    # scipy only here: the GPU kit imports every module but never reads a devkit, and its image has no scipy.
    from scipy.io import loadmat

    try:
        synsets = np.atleast_1d(loadmat(io.BytesIO(data), squeeze_me=True)["synsets"])
        fields = set(synsets.dtype.names or ())
    except (KeyError, ValueError, TypeError) as e:
        raise ArchiveError(f"{path}: {META} has no struct array 'synsets' ({e}); download {DEVKIT} again") from e
    missing = {"ILSVRC2012_ID", "WNID", "num_children"} - fields
    if missing:
        raise ArchiveError(f"{path}: {META}'s synsets lack {', '.join(sorted(missing))}; download {DEVKIT} again")
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}


def _ground_truth(path: Path, data: bytes) -> list[int]:
    """The ILSVRC2012_ID on each line of the validation ground truth."""
    ids = []
    for line_no, line in enumerate(data.decode().splitlines(), start=1):
        if not line.strip().isdigit():
            raise ArchiveError(f"{path}: {GROUND_TRUTH}:{line_no}: expected an ILSVRC2012_ID, got {line!r}")
        ids.append(int(line))
    return ids


def zip_listing(path: Path) -> dict[str, Member]:
    """{member name: Member} of every file in a zip, from its central directory."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = [i for i in z.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError) as e:
        raise ArchiveError(f"{path}: not a readable zip ({e}); download it again") from e
    members: dict[str, Member] = {}
    for info in infos:
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ArchiveError(
                f"{path}: {info.filename} uses compression method {info.compress_type}; only stored and "
                "deflated members are read; repack it with zip"
            )
        if info.filename in members:
            raise ArchiveError(f"{path}: {info.filename} appears twice; download it again")
        members[info.filename] = Member(str(path), info.header_offset, info.compress_size, info.compress_type, info.CRC)
    return members


def zip_text(path: Path, name: str) -> str:
    """One small text member of a zip (Kaggle's label CSV)."""
    with zipfile.ZipFile(path) as z:
        return z.read(name).decode()
