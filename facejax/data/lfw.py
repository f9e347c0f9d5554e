"""LFW from its public archive: download (resumable, sha256-checked), unpack, align.

Labeled Faces in the Wild (Huang et al., 2007; for research use): 13,233 photos of 5,749
people, `lfw/<Name>/<Name>_0001.jpg`, and `pairs.txt`, the standard verification list (View 2:
10 folds x 600 pairs). The files and checksums are those scikit-learn's `fetch_lfw_*` uses
(a figshare mirror of the UMass release); the UMass address is tried second.

Layout written under `dst`:
  downloads/lfw.tgz, downloads/pairs.txt    the checked downloads
  raw/<Name>/<Name>_NNNN.jpg                 the unpacked photos (250 x 250)
  aligned/<Name>/...                         dlib chips (150 px): data.root for dlib_resnet
  pairs.txt                                  beside aligned/, where eval_verification finds it
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tarfile

from facejax.download import fetch
from facejax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Remote:
    name: str
    urls: tuple[str, ...]
    sha256: str


ARCHIVE = Remote("lfw.tgz", ("https://ndownloader.figshare.com/files/5976018",
                             "http://vis-www.cs.umass.edu/lfw/lfw.tgz"),
                 "055f7d9c632d7370e6fb4afc7468d40f970c34a80d4c6f50ffec63f5a8d536c0")
PAIRS = Remote("pairs.txt", ("https://ndownloader.figshare.com/files/5976006",
                             "http://vis-www.cs.umass.edu/lfw/pairs.txt"),
               "ea42330c62c92989f9d7c03237ed5d591365e89b3e649747777b70e692dc1592")
_UNPACKED = ".unpacked"  # written into raw/ once the archive is fully extracted


def get_lfw(dst: str, *, align: bool = True, archive: Remote = ARCHIVE, pairs: Remote = PAIRS,
            progress: bool = True) -> dict:
    """Downloads, unpacks and (with `align`) aligns LFW under `dst`; every step resumes.

    Returns the paths written: {"raw", "aligned" (or None), "pairs", "summary"}.
    Raises DataError offline or on a checksum mismatch, saying what to fetch and where.
    """
    downloads = os.path.join(dst, "downloads")
    tgz = fetch(list(archive.urls), os.path.join(downloads, archive.name), archive.sha256,
                what=archive.name, progress=progress)
    pairs_file = fetch(list(pairs.urls), os.path.join(downloads, pairs.name), pairs.sha256,
                       what=pairs.name, progress=progress)
    raw = os.path.join(dst, "raw")
    people = _unpack(tgz, raw)
    shutil.copyfile(pairs_file, os.path.join(dst, "pairs.txt"))
    out = dict(raw=people, aligned=None, pairs=os.path.join(dst, "pairs.txt"), summary="")
    if align:
        from facejax.data.align_dlib import align_folder

        aligned = os.path.join(dst, "aligned")
        out.update(aligned=aligned,
                   summary=align_folder(people, aligned, progress=progress).line())
    return out


def _unpack(tgz: str, raw: str) -> str:
    """Extracts the archive into `raw` (once; an interrupted extraction starts over) and returns
    the folder holding one sub-folder per person."""
    stamp = os.path.join(raw, _UNPACKED)
    if not os.path.isfile(stamp):
        shutil.rmtree(raw, ignore_errors=True)
        tmp = raw + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with tarfile.open(tgz) as tar:
                tar.extractall(tmp, filter="data")  # no links out, no absolute paths
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"cannot unpack {tgz}: {e}") from None
        os.replace(tmp, raw)
        with open(stamp, "w") as f:
            f.write("ok\n")
    entries = [e for e in os.listdir(raw) if not e.startswith(".")]
    # The archive holds one top folder (lfw/ or lfw_funneled/) with a folder per person.
    if len(entries) == 1 and os.path.isdir(os.path.join(raw, entries[0])):
        return os.path.join(raw, entries[0])
    return raw
