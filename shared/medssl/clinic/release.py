"""Releasing and pulling bundles: deterministic zips, a checksummed index, verified and safe extraction.

``python -m medssl package --bundle NAME [--weights PATH] --out dist/`` builds ``NAME_vVERSION.zip`` (top folder
``NAME/``; configs, docs, LICENSE, and with weights ``models/model.pt``, its TorchScript ``models/model.ts`` and
``large_files.yml`` listing them, ``model.pt`` with its sha256)
with deterministic bytes (sorted entries, fixed timestamps and permissions), and records it in ``bundle_index.json``
in the shape of MONAI model-zoo's ``model_info.json`` (``{"NAME_vVERSION": {"checksum": sha1, "source": url}}``)
plus ``sha256``. A version already in the index with other bytes is refused: a release never changes under a name.

``python -m medssl pull NAME [--version V] [--index PATH_OR_URL] --bundle_dir DIR`` downloads the zip, checks its
sha256 (MONAI's own ``download`` does not), refuses members that would land outside the bundle folder (absolute
paths, ``..``, links, another top folder), and extracts into a temporary folder that is renamed to
``DIR/NAME_vVERSION`` only when everything succeeded: a failed pull leaves nothing behind. Stock
``python -m monai.bundle download --name NAME --url URL --bundle_dir DIR`` and ``monai.bundle.load`` read the
same zips.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from medssl.bundle import bundle_path
from medssl.data import atomic_path, write_json

__all__ = ["package", "pull", "read_index", "write_large_files", "ReleaseError", "INDEX_NAME"]

INDEX_NAME = "bundle_index.json"
DEFAULT_BASE_URL = "https://github.com/medssl/medssl/releases/download"
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)
_SKIP_DIRS = {"models", "eval", "logs", "__pycache__", "runs"}


class ReleaseError(RuntimeError):
    """A release or pull was refused: the message says which file, entry or checksum and why."""


def _hashes(path: Path) -> Dict[str, str]:
    sha1, sha256 = hashlib.sha1(), hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha1.update(chunk)
            sha256.update(chunk)
    return {"sha1": sha1.hexdigest(), "sha256": sha256.hexdigest()}


def _bundle_files(root: Path) -> Dict[str, Path]:
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not path.is_symlink() and not (set(rel.parts[:-1]) & _SKIP_DIRS):
            if not rel.name.startswith(".") and not rel.name.endswith(".pyc"):
                files[rel.as_posix()] = path
    return files


def _torchscript_of(root: Path, weights: Path, tmp: Path) -> Path:
    """``models/model.ts`` of bundle ``root`` with ``weights``, made in a scratch copy of its configs under ``tmp``."""
    from medssl.export import ExportError, ensure

    scratch = tmp / "bundle"
    shutil.copytree(root / "configs", scratch / "configs")
    (scratch / "models").mkdir()
    shutil.copyfile(weights, scratch / "models" / "model.pt")
    try:
        return ensure(scratch, "ts")
    except ExportError as e:
        raise ReleaseError(str(e)) from e


def package(
    bundle: str,
    out: str = "dist",
    weights: Optional[str] = None,
    index: Optional[str] = None,
    base_url: str = DEFAULT_BASE_URL,
    bundles_dir: Optional[str] = None,
    half: bool = False,
    torchscript: bool = True,
    record_in_bundle: bool = False,
) -> Path:
    """Build ``out/NAME_vVERSION.zip`` and record it in the index (``out/bundle_index.json`` by default).

    Args:
        bundle: bundle name (its folder is found as :func:`medssl.bundle.bundle_path` does).
        out: output folder.
        weights: a ``models/model.pt`` to include (with its TorchScript export); None for configs only.
        index: the index file to update (default ``out/bundle_index.json``).
        base_url: where the zips will be served; ``source = base_url/NAME_vVERSION.zip``. An empty string records
            the zip's path relative to the index's folder, which :func:`pull` resolves next to the index (a local
            or offline mirror, or zips committed beside the index).
        half: store floating-point weights as float16 (half the bytes; they load into the float32 network).
        torchscript: include ``models/model.ts``; without it :func:`pull` exports it after extracting.
        record_in_bundle: also write the bundle's own ``large_files.yml`` (its weights' URLs and sha256) into the
            source bundle folder, as a release does; the zip always holds it.

    Raises:
        ReleaseError: the version is already in the index with other bytes, or the weights do not load.
    """
    root = bundle_path(bundle, bundles_dir)
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    version = str(meta["version"])
    key = f"{bundle}_v{version}"
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    zip_path = out_dir / f"{key}.zip"
    index_path = Path(index) if index else out_dir / INDEX_NAME
    files = _bundle_files(root)
    with tempfile.TemporaryDirectory() as tmp:
        if weights:
            import torch

            from medssl.weights import half_state, load_state

            try:
                state = load_state(weights)
            except (FileNotFoundError, ValueError) as e:
                raise ReleaseError(str(e)) from e
            model_pt = Path(tmp) / "model.pt"
            torch.save(half_state(state) if half else state, model_pt)
            files["models/model.pt"] = model_pt
            if torchscript:
                files["models/model.ts"] = _torchscript_of(root, model_pt, Path(tmp))
            asset_base = f"{(base_url or DEFAULT_BASE_URL).rstrip('/')}/{key}"
            weights_files = {
                "models/model.pt": {"sha256": _hashes(model_pt)["sha256"], "url": f"{asset_base}/model.pt"},
            }
            large_files = Path(tmp) / "large_files.yml"
            _write_bundle_large_files(weights_files, key, large_files)
            files["large_files.yml"] = large_files
        with atomic_path(zip_path) as tmp_zip:
            with zipfile.ZipFile(tmp_zip, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
                for rel in sorted(files):
                    info = zipfile.ZipInfo(f"{bundle}/{rel}", date_time=_FIXED_TIME)
                    info.external_attr = (stat.S_IFREG | 0o644) << 16
                    info.compress_type = zipfile.ZIP_DEFLATED
                    zf.writestr(info, files[rel].read_bytes(), compresslevel=9)
            digest = _hashes(tmp_zip)
            entries = read_index(str(index_path)) if index_path.is_file() else {}
            old = entries.get(key)
            if old and old.get("sha256") != digest["sha256"]:
                raise ReleaseError(
                    f"{index_path}: {key} is already released with sha256 {old.get('sha256')}; these bytes differ "
                    f"({digest['sha256']}). Bump the version in {root / 'configs' / 'metadata.json'} to release them."
                )
    entries[key] = {
        "checksum": digest["sha1"],
        "sha256": digest["sha256"],
        "source": (
            f"{base_url.rstrip('/')}/{zip_path.name}"
            if base_url
            else Path(os.path.relpath(zip_path.resolve(), index_path.resolve().parent)).as_posix()
        ),
    }
    if weights:
        entries[key]["files"] = weights_files
        if record_in_bundle:  # the source bundle lists its released weights too (the release step does this)
            _write_bundle_large_files(weights_files, key, root / "large_files.yml")
    write_json(dict(sorted(entries.items())), index_path)
    write_large_files(index_path, out_dir / "large_files.yml")
    return zip_path


def _write_bundle_large_files(weights_files: Dict[str, Dict[str, str]], key: str, target: Path) -> Path:
    """A bundle's own ``large_files.yml`` in model-zoo's form: its released ``models/model.pt`` with its URL (an asset
    of release ``key``) and sha256 (as recorded under ``files`` in the bundle index), and ``models/model.ts`` without a
    hash: it is made from ``model.pt`` where the bundle is pulled, and TorchScript files are not byte-reproducible
    (each save writes a random serialization id, and attribute order follows Python's string hashing)."""
    lines = [
        f"# Weights of release {key} (its zip is listed in bundle_index.json; `python -m medssl pull` fetches and",
        "# verifies it, then makes models/model.ts and models/model.pt2 from models/model.pt: see models/exports.json).",
        "large_files:",
    ]
    for rel, entry in sorted(weights_files.items()):
        lines += [f'  - path: "{rel}"', f'    url: "{entry["url"]}"', f'    hash_val: "{entry["sha256"]}"',
                  '    hash_type: "sha256"']  # fmt: skip
    lines += [
        "  # made from models/model.pt at pull time (TorchScript bytes differ from save to save: no fixed hash)",
        '  - path: "models/model.ts"',
        f'    url: "{weights_files["models/model.pt"]["url"].rsplit("/", 1)[0]}/model.ts"',
        '    hash_val: ""',
        '    hash_type: ""',
    ]
    with atomic_path(target) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    return target


def write_large_files(index: os.PathLike | str, target: os.PathLike | str) -> Path:
    """``large_files.yml`` in model-zoo's form (``large_files: [{path, url, hash_val, hash_type}]``) for every zip of
    the index: ``path`` relative to the index's folder, ``url`` the source (relative sources stay relative)."""
    entries = read_index(str(index))
    lines = ["large_files:"]
    for key, entry in sorted(entries.items()):
        src = entry["source"]
        path = src if not urllib.parse.urlparse(src).scheme else f"{key}.zip"
        lines += [f'  - path: "{path}"', f'    url: "{src}"', f'    hash_val: "{entry.get("sha256", "")}"',
                  '    hash_type: "sha256"']  # fmt: skip
    target = Path(target)
    with atomic_path(target) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    return target


def read_index(index: str) -> Dict[str, Dict[str, Any]]:
    """The index at a local path or an http(s)/file URL.

    Raises:
        ReleaseError: it cannot be read or is not an object of ``{"NAME_vVERSION": {"source", "sha256"...}}``.
    """
    try:
        if urllib.parse.urlparse(index).scheme in ("http", "https", "file"):
            with urllib.request.urlopen(index, timeout=60) as r:
                raw = r.read()
        else:
            raw = Path(index).read_bytes()
        entries = json.loads(raw)
    except Exception as e:
        raise ReleaseError(
            f"{index}: cannot read the bundle index ({type(e).__name__}: {e}). Pass --index PATH_OR_URL (or set "
            "MEDSSL_INDEX) to a bundle_index.json you can reach, e.g. a local mirror's."
        ) from e
    if not isinstance(entries, dict) or not all(isinstance(v, dict) and "source" in v for v in entries.values()):
        raise ReleaseError(f"{index}: expected {{'NAME_vVERSION': {{'checksum', 'sha256', 'source'}}, ...}}.")
    return entries


def _version_key(version: str) -> Tuple:
    return tuple(int(p) if p.isdigit() else p for p in version.split("."))


def _resolve_source(source: str, index: str) -> str:
    """A source relative to an index that is a URL or a path resolves next to it (for local mirrors)."""
    if urllib.parse.urlparse(source).scheme or os.path.isabs(source):
        return source
    if urllib.parse.urlparse(index).scheme:
        return urllib.parse.urljoin(index, source)
    return str(Path(index).parent / source)


def _check_members(zf: zipfile.ZipFile, name: str, zip_name: str) -> None:
    seen = set()
    for info in zf.infolist():
        member = info.filename
        parts = Path(member).parts
        mode = info.external_attr >> 16
        if member.startswith(("/", "\\")) or (len(member) > 1 and member[1] == ":") or ".." in parts:
            raise ReleaseError(f"{zip_name}: member {member!r} would be written outside the bundle folder.")
        if not parts or parts[0] != name:
            raise ReleaseError(f"{zip_name}: member {member!r} is not under the top folder {name!r}/.")
        if stat.S_ISLNK(mode):
            raise ReleaseError(f"{zip_name}: member {member!r} is a symbolic link; bundles hold regular files only.")
        if member in seen:
            raise ReleaseError(f"{zip_name}: member {member!r} appears twice.")
        seen.add(member)


def pull(
    name: str, bundle_dir: str, version: Optional[str] = None, index: str = INDEX_NAME, torchscript: bool = True
) -> Path:
    """Download, verify and extract bundle ``name`` into ``bundle_dir/NAME_vVERSION`` (see the module docstring).
    A release with ``models/model.pt`` gets ``models/model.ts`` and ``models/model.pt2`` made here from it (see
    :mod:`medssl.export`; recorded in ``models/exports.json``), before the folder is put in place
    (``torchscript=False`` skips that; they are then made on first use).

    Returns the bundle folder (already there and verified: returned as is).

    Raises:
        ReleaseError: no such bundle/version, a checksum mismatch, an unsafe member, or a download failure;
            nothing is left in ``bundle_dir`` then.
    """
    entries = read_index(index)
    versions = {k[len(name) + 2 :]: v for k, v in entries.items() if k.startswith(f"{name}_v")}
    if not versions:
        raise ReleaseError(f"{index}: no bundle {name!r}; it lists {sorted(entries)}.")
    version = version or max(versions, key=_version_key)
    if version not in versions:
        raise ReleaseError(f"{index}: {name!r} has no version {version!r}; it has {sorted(versions)}.")
    entry = versions[version]
    target = Path(bundle_dir) / f"{name}_v{version}"
    marker = target / ".medssl_pull.json"
    if marker.is_file() and json.loads(marker.read_text()).get("sha256") == entry.get("sha256"):
        return target
    if target.exists():
        raise ReleaseError(f"{target} exists but is not the verified pull of {name} {version}; move it away first.")
    Path(bundle_dir).mkdir(parents=True, exist_ok=True)
    source = _resolve_source(entry["source"], index)
    with tempfile.TemporaryDirectory(dir=bundle_dir, prefix=f".{name}_v{version}.") as tmp:
        zip_path = Path(tmp) / f"{name}_v{version}.zip"
        try:
            if urllib.parse.urlparse(source).scheme:
                with urllib.request.urlopen(source, timeout=300) as r, open(zip_path, "wb") as f:
                    shutil.copyfileobj(r, f)
            else:
                shutil.copyfile(source, zip_path)
        except Exception as e:
            raise ReleaseError(f"{source}: download failed ({type(e).__name__}: {e}).") from e
        digest = _hashes(zip_path)
        expected = entry.get("sha256")
        if not expected:
            raise ReleaseError(f"{index}: {name}_v{version} has no sha256; refusing an unverifiable bundle.")
        if digest["sha256"] != expected or ("checksum" in entry and digest["sha1"] != entry["checksum"]):
            raise ReleaseError(
                f"{source}: sha256 {digest['sha256']} does not match the index ({expected}); the "
                "download is corrupt or was tampered with. Nothing was extracted."
            )
        try:
            with zipfile.ZipFile(zip_path) as zf:
                _check_members(zf, name, zip_path.name)
                extract = Path(tmp) / "x"
                zf.extractall(extract)
        except zipfile.BadZipFile as e:
            raise ReleaseError(f"{source}: not a zip file ({e}).") from e
        if torchscript and (extract / name / "models" / "model.pt").is_file():
            from medssl.export import ExportError, ensure

            for kind in ("ts", "pt2"):
                try:
                    ensure(extract / name, kind)
                except ExportError as e:
                    raise ReleaseError(f"{source}: {e}") from e
        write_json({"name": name, "version": version, "source": source, **digest}, extract / name / marker.name)
        os.replace(extract / name, target)
    return target
