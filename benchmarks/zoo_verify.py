"""MONAI model-zoo's own bundle verifier (``ci/verify_bundle.py`` of a model-zoo checkout) on every medssl bundle with
placeholder weights, and on released bundles with their real weights, offline.

    python benchmarks/zoo_verify.py --zoo /path/to/model-zoo --out benchmarks/results/zoo_verifier
    python benchmarks/zoo_verify.py --zoo /path/to/model-zoo --bundles '' --releases la_seg_finetune,pcrl_pretrain

Without ``--zoo`` (or ``MEDSSL_MODEL_ZOO``) it prints why and exits 0: nothing is downloaded, neither the zoo nor its
schema. The checkout needs ``ci/verify_bundle.py`` (with its ``utils.py`` and ``bundle_custom_data.py``) and
``models/model_info.json``, which full mode reads.

Each run works in a temporary models folder, as the zoo's CI does after its own preparation step:

- the bundle (``bundles/NAME`` without ``models/`` and ``eval/``, or the folder ``medssl pull`` extracted) is copied to
  ``MODELS/NAME``; placeholder runs add ``models/model.pt``: the state dict of ``network_def`` (inference.json) with
  its random initialisation, as the verifier's own fake weights;
- ``eval/schema.json`` is the local copy of the metadata schema (``--schema``; what ``ci/prepare_schema.py`` would
  download), and ``MODELS/model_info.json`` the checkout's;
- a ``large_files`` file whose entries all exist locally with their hashes is kept (the verifier then skips the
  download). Otherwise the verifier would download the released files (over the placeholder, or because they are
  missing): such a file is set aside in the copy and the run says so.

Then ``python ci/verify_bundle.py -b NAME -p MODELS -m MODE`` runs from the checkout's root with this Python, for each
``--modes`` (``regular``: the files, the metadata against the schema; ``full``, the verifier's default: also version and
changelog against model_info.json, app properties, ``verify_net_in_out`` and the TorchScript export of ``network_def``
with the weights, and loading ``models/model.ts`` when there is one). Writes ``results.json`` and ``results.md`` under
``--out`` (when given) and prints the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("la_seg_finetune", "cvrl_semisup", "simcvd_distill", "pcrl_pretrain", "spark_pretrain")
MODES = ("regular", "full")
SHARED = Path(os.environ.get("MEDSSL_SHARED_DIR", REPO.parent / "shared"))
DEFAULT_SCHEMA = SHARED / "schema" / "meta_schema_20240725.json"
EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w]*\.)*[A-Za-z_]\w*(Error|Exception):")
# what verify_bundle.py prints after each check it passes, in its order
CHECKS = {
    "directory is verified correctly.": "files",
    "version and changelog are verified correctly.": "version",
    "metadata format is verified correctly.": "metadata",
    "properties are verified correctly.": "properties",
    "data shape is verified correctly.": "net_in_out",
    "export weights into TorchScript module successfully.": "torchscript_export",
    "Provided TorchScript module is verified correctly.": "model_ts_loads",
}


def _sha(path: Path, hash_type: str) -> str:
    h = hashlib.new(hash_type)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _large_files(bundle: Path) -> Optional[Path]:
    found = [
        bundle / f"large_files.{ext}" for ext in ("json", "yaml", "yml") if (bundle / f"large_files.{ext}").is_file()
    ]
    return found[-1] if found else None  # the verifier takes the last of json, yaml, yml that exists


def _entries_missing_locally(bundle: Path, large: Path) -> Tuple[List[str], int]:
    """The ``large_files`` entries that the verifier would download (absent, or present with another hash), and
    the number of entries."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(large))
    missing, entries = [], parser.get()["large_files"]
    for entry in entries:
        path = bundle / entry["path"]
        hash_val, hash_type = entry.get("hash_val", ""), entry.get("hash_type", "md5") or "md5"
        if not path.is_file() or (hash_val and _sha(path, hash_type.lower()) != hash_val):
            missing.append(entry["path"])
    return missing, len(entries)


def _placeholder_weights(bundle: Path) -> None:
    """``models/model.pt``: ``network_def`` of inference.json with its random initialisation."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle)
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(net.state_dict(), bundle / "models" / "model.pt")


def _pull(name: str, index: str, dest: Path) -> Path:
    out = subprocess.run(
        [sys.executable, "-m", "medssl", "pull", name, "--index", index, "--bundle_dir", str(dest)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return Path(out.strip().splitlines()[-1])


def verify(zoo: Path, models: Path, name: str, mode: str, timeout: int) -> Dict[str, object]:
    cmd = [sys.executable, str(zoo / "ci" / "verify_bundle.py"), "-b", name, "-p", str(models), "-m", mode]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=zoo, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    return {
        "mode": mode,
        "returncode": proc.returncode,
        "passed": proc.returncode == 0,
        "checks": [check for text, check in CHECKS.items() if text in log],
        "error": "" if proc.returncode == 0 else _last_exception(log),
        "seconds": round(time.perf_counter() - t, 1),
        "log_tail": log[-2000:],
    }


def _last_exception(log: str) -> str:
    """The last ``SomeError: message`` line of a traceback (with the next line when the message starts there)."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if EXCEPTION_LINE.match(lines[i]):
            head = lines[i]
            return f"{head} {lines[i + 1]}" if head.endswith(":") and i + 1 < len(lines) else head
    return lines[-1] if lines else ""


def run_one(zoo: Path, schema: Path, name: str, source: Path, placeholder: bool, modes, timeout: int) -> List[dict]:
    results = []
    for mode in modes:
        with tempfile.TemporaryDirectory(prefix="zoo_verify_") as tmp:
            models = Path(tmp) / "models"
            bundle = models / name
            shutil.copytree(
                source,
                bundle,
                ignore=shutil.ignore_patterns("eval", "__pycache__", *(["models"] if placeholder else [])),
            )
            shutil.copyfile(zoo / "models" / "model_info.json", models / "model_info.json")
            (bundle / "eval").mkdir(exist_ok=True)
            shutil.copyfile(schema, bundle / "eval" / "schema.json")
            if placeholder:
                _placeholder_weights(bundle)
            note = ""
            large = _large_files(bundle)
            if large is not None:
                missing, count = _entries_missing_locally(bundle, large)
                if missing:
                    large.unlink()
                    note = f"{large.name} set aside: the verifier would download {', '.join(missing)}"
                elif count == 0:
                    note = f"{large.name}: no entries"
                else:
                    note = f"{large.name} kept: its {count} files are here with their hashes"
            else:
                note = "no large_files file"
            result = verify(zoo, models, name, mode, timeout)
            result.update(bundle=name, weights="placeholder" if placeholder else "released", note=note)
            results.append(result)
            print(f"{name:16s} {result['weights']:11s} {mode:8s} {'PASS' if result['passed'] else 'FAIL'}", flush=True)
    return results


def table(results: List[dict], modes) -> str:
    """One row per bundle and weights: each mode's verdict, the checks the last mode passed, the notes."""
    rows = ["| bundle | weights | " + " | ".join(modes) + " | checks passed | note |"]
    rows.append("|---|---|" + "---|" * len(modes) + "---|---|")
    keys = list(dict.fromkeys((r["bundle"], r["weights"]) for r in results))
    for bundle, weights in keys:
        runs = {r["mode"]: r for r in results if (r["bundle"], r["weights"]) == (bundle, weights)}
        cells = [
            "-" if m not in runs else "pass" if runs[m]["passed"] else f"FAIL: {runs[m]['error'][:160]}" for m in modes
        ]
        last = runs[[m for m in modes if m in runs][-1]]
        notes = "; ".join(dict.fromkeys(r["note"] for r in runs.values() if r["note"]))
        rows.append(f"| {bundle} | {weights} | " + " | ".join(cells) + f" | {', '.join(last['checks'])} | {notes} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default=os.environ.get("MEDSSL_MODEL_ZOO"), help="a model-zoo checkout (ci/, models/)")
    ap.add_argument("--schema", default=str(DEFAULT_SCHEMA), help="local copy of the metadata schema")
    ap.add_argument("--bundles", default=",".join(BUNDLES), help="bundles to verify with placeholder weights ('' none)")
    ap.add_argument("--releases", default="", help="bundles to pull from --index and verify with their weights")
    ap.add_argument("--index", default=str(REPO / "bundle_index.json"))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--timeout", type=int, default=900, help="seconds per verifier run")
    ap.add_argument("--out", default=None, help="folder for results.json and results.md")
    args = ap.parse_args()
    if not args.zoo:
        print(
            "zoo_verify: skipped, no model-zoo checkout given (--zoo PATH or MEDSSL_MODEL_ZOO); nothing is downloaded."
        )
        return 0
    zoo, schema = Path(args.zoo).resolve(), Path(args.schema)
    for needed in (zoo / "ci" / "verify_bundle.py", zoo / "models" / "model_info.json", schema):
        if not needed.is_file():
            print(f"zoo_verify: skipped, {needed} not found; nothing is downloaded.")
            return 0
    modes = [m for m in args.modes.split(",") if m]
    results: List[dict] = []
    for name in [b for b in args.bundles.split(",") if b]:
        results += run_one(zoo, schema, name, REPO / "bundles" / name, True, modes, args.timeout)
    releases = [b for b in args.releases.split(",") if b]
    if releases:
        with tempfile.TemporaryDirectory(prefix="zoo_pull_") as pulled:
            for name in releases:
                folder = _pull(name, args.index, Path(pulled))
                results += run_one(zoo, schema, name, folder, False, modes, args.timeout)
    zoo_head = subprocess.run(["git", "-C", str(zoo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    import monai
    import torch

    meta = {
        "zoo_head": zoo_head.strip() or None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }
    md = table(results, modes)
    print(md)
    head = f"model-zoo {meta['zoo_head'] or '(not a git checkout)'}; torch {meta['torch']}, monai {meta['monai']}"
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        (out / "results.md").write_text(f"{head}\n\n{md}\n")
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
