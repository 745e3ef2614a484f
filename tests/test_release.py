"""Releases served over real HTTP on 127.0.0.1: package (deterministic zips, checksummed index), pull (verified,
safe extraction), inference from a pulled bundle, TorchScript with plain torch, stock MONAI download / load."""

import hashlib
import json
import shutil
import socket
import stat
import subprocess
import sys
import time
import urllib.request
import zipfile

import nibabel as nib
import pytest
import torch
from helpers import REPO

from medssl.networks import PCRLNet, VNet
from medssl.clinic.release import ReleaseError, package, pull
from medssl.lab.sample_data import sample_data

BUNDLES = {"la_seg_finetune": VNet, "cvrl_semisup": VNet, "simcvd_distill": VNet, "pcrl_pretrain": PCRLNet}
VERSION = {n: json.loads((REPO / "bundles" / n / "configs" / "metadata.json").read_text())["version"] for n in BUNDLES}
SEG = f"la_seg_finetune_v{VERSION['la_seg_finetune']}"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(module_tmp):
    """Every bundle packaged with (untrained, seeded) weights into dist/, served by `python -m http.server`."""
    root = module_tmp("release")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    dist = root / "dist"
    for name, net in BUNDLES.items():
        torch.manual_seed(len(name))
        torch.save(net().state_dict(), root / f"{name}.pt")
        package(name, out=str(dist), weights=str(root / f"{name}.pt"), base_url=base)
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(dist)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{base}/bundle_index.json", timeout=1).read()
            break
        except OSError:
            time.sleep(0.1)
    yield root, dist, base
    server.terminate()
    server.wait()


def test_package_is_deterministic_and_indexed(served, tmp_path):
    root, dist, base = served
    index = json.loads((dist / "bundle_index.json").read_text())
    assert sorted(index) == sorted(f"{n}_v{VERSION[n]}" for n in BUNDLES)
    for key, entry in index.items():
        data = (dist / f"{key}.zip").read_bytes()
        assert entry["checksum"] == hashlib.sha1(data).hexdigest()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["source"] == f"{base}/{key}.zip"
    names = zipfile.ZipFile(dist / f"{SEG}.zip").namelist()
    assert names == sorted(names) and all(n.startswith("la_seg_finetune/") for n in names)
    assert {
        "la_seg_finetune/models/model.pt",
        "la_seg_finetune/models/model.ts",
        "la_seg_finetune/configs/metadata.json",
        "la_seg_finetune/docs/README.md",
    } <= set(names)
    # same input, same bytes (a second build into another folder)
    again = package("la_seg_finetune", out=str(tmp_path), weights=str(root / "la_seg_finetune.pt"), base_url=base)
    assert again.read_bytes() == (dist / f"{SEG}.zip").read_bytes()
    # a version already released with other bytes is refused, the index and zip are untouched
    torch.save(VNet().state_dict(), tmp_path / "other.pt")
    before = (tmp_path / "bundle_index.json").read_text()
    with pytest.raises(ReleaseError, match=f"{SEG} is already released with sha256"):
        package("la_seg_finetune", out=str(tmp_path), weights=str(tmp_path / "other.pt"), base_url=base)
    assert (tmp_path / "bundle_index.json").read_text() == before


@pytest.mark.parametrize("name", list(BUNDLES))
def test_pull_by_name_runs_inference_and_torchscript_without_medssl(name, served, tmp_path):
    root, dist, base = served
    folder = pull(name, bundle_dir=str(tmp_path / "pulled"), index=f"{base}/bundle_index.json")
    assert folder == tmp_path / "pulled" / f"{name}_v{VERSION[name]}"
    assert (folder / "configs" / "inference.json").is_file() and (folder / "models" / "model.pt").is_file()
    assert pull(name, bundle_dir=str(tmp_path / "pulled"), index=f"{base}/bundle_index.json") == folder  # no-op
    data = sample_data(tmp_path / "data", num_cases=2, shape=(32, 32, 32), num_test=1)
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            str(folder / "configs" / "inference.json"),
            "--bundle_root",
            str(folder),
            "--dataset_dir",
            str(data),
            "--patch_size",
            "[32,32,32]",
            "--num_workers",
            "0",
            "--output_dir",
            str(out),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    (result,) = list(out.glob("sample_001_*.nii.gz"))
    assert nib.load(result).shape == (32, 32, 32)
    # TorchScript with plain torch, in a process that never imports medssl
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    script = (
        f"import sys, torch; m = torch.jit.load({str(folder / 'models' / 'model.ts')!r}).eval(); "
        f"torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r}); "
        "assert not any(k.startswith('medssl') for k in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    eager = BUNDLES[name]().eval()
    eager.load_state_dict(torch.load(folder / "models" / "model.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), eager(x), rtol=1e-5, atol=1e-5)


def _serve_variant(dist, tmp_path, name, mutate):
    """A copy of dist/ whose zip for ``name`` is rewritten by ``mutate(bytes) -> bytes``; index as given."""
    mirror = tmp_path / "mirror"
    shutil.copytree(dist, mirror)
    zip_path = mirror / f"{name}_v{VERSION[name]}.zip"
    zip_path.write_bytes(mutate(zip_path.read_bytes()))
    index = json.loads((mirror / "bundle_index.json").read_text())
    for entry in index.values():
        entry["source"] = entry["source"].rsplit("/", 1)[1]  # served next to the index (a local mirror)
    (mirror / "bundle_index.json").write_text(json.dumps(index))
    return mirror, index


def test_tampered_zip_is_refused_and_nothing_extracted(served, tmp_path):
    _, dist, _ = served

    def flip(data):
        data = bytearray(data)
        data[len(data) // 2] ^= 0xFF
        return bytes(data)

    mirror, _ = _serve_variant(dist, tmp_path, "la_seg_finetune", flip)
    target = tmp_path / "pulled"
    with pytest.raises(ReleaseError, match="does not match the index .* Nothing was extracted"):
        pull("la_seg_finetune", bundle_dir=str(target), index=str(mirror / "bundle_index.json"))
    assert list(target.iterdir()) == []  # no bundle folder, no temporary folder


@pytest.mark.parametrize("attack", ["traversal", "absolute", "symlink", "other_top_folder"])
def test_unsafe_members_are_refused_even_with_a_matching_checksum(attack, served, tmp_path):
    _, dist, _ = served
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("la_seg_finetune/configs/metadata.json", "{}")
        if attack == "traversal":
            zf.writestr("la_seg_finetune/../../evil.txt", "x")
        elif attack == "absolute":
            zf.writestr("/tmp/evil.txt", "x")
        elif attack == "symlink":
            info = zipfile.ZipInfo("la_seg_finetune/models/model.pt")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
        else:
            zf.writestr("somewhere_else/evil.txt", "x")
    mirror, index = _serve_variant(dist, tmp_path, "la_seg_finetune", lambda _: bad.read_bytes())
    data = (mirror / f"{SEG}.zip").read_bytes()
    index[SEG].update(
        sha256=hashlib.sha256(data).hexdigest(), checksum=hashlib.sha1(data).hexdigest()
    )
    (mirror / "bundle_index.json").write_text(json.dumps(index))
    target = tmp_path / "pulled"
    expected = {
        "traversal": "outside the bundle folder",
        "absolute": "outside the bundle folder",
        "symlink": "is a symbolic link",
        "other_top_folder": "is not under the top folder",
    }[attack]
    with pytest.raises(ReleaseError, match=expected):
        pull("la_seg_finetune", bundle_dir=str(target), index=str(mirror / "bundle_index.json"))
    assert list(target.iterdir()) == [] and not (tmp_path / "evil.txt").exists()


def test_pull_errors_are_clear(served, tmp_path):
    _, dist, _ = served
    with pytest.raises(ReleaseError, match="no bundle 'nope'"):
        pull("nope", bundle_dir=str(tmp_path), index=str(dist / "bundle_index.json"))
    with pytest.raises(ReleaseError, match="has no version '9.9'"):
        pull("la_seg_finetune", bundle_dir=str(tmp_path), version="9.9", index=str(dist / "bundle_index.json"))
    with pytest.raises(ReleaseError, match="cannot read the bundle index"):
        pull("la_seg_finetune", bundle_dir=str(tmp_path), index=str(tmp_path / "missing.json"))


def test_stock_monai_download_and_load(served, tmp_path):
    _, dist, base = served
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "download",
            "--name",
            "la_seg_finetune",
            "--url",
            f"{base}/{SEG}.zip",
            "--bundle_dir",
            str(tmp_path),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (tmp_path / "la_seg_finetune" / "configs" / "inference.json").is_file()
    from monai.bundle import load

    net = load(name="la_seg_finetune", bundle_dir=str(tmp_path), workflow_type="inference", device="cpu")
    assert isinstance(net, VNet)
    weights = torch.load(tmp_path / "la_seg_finetune" / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in weights.items())


def test_cli_package_and_pull(served, tmp_path):
    root, _, _ = served
    dist = tmp_path / "dist"
    cmd = [
        sys.executable,
        "-m",
        "medssl",
        "package",
        "--bundle",
        "la_seg_finetune",
        "--weights",
        str(root / "la_seg_finetune.pt"),
        "--out",
        str(dist),
        "--base_url",
        "",
    ]
    assert subprocess.run(cmd, cwd=REPO, capture_output=True, text=True).returncode == 0
    assert json.loads((dist / "bundle_index.json").read_text())[SEG]["source"] == (
        f"{SEG}.zip"
    )  # relative: resolved next to the index, an offline mirror
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medssl",
            "pull",
            "la_seg_finetune",
            "--bundle_dir",
            str(tmp_path / "b"),
            "--index",
            str(dist / "bundle_index.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "b" / SEG / "models" / "model.ts").is_file()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "medssl",
            "pull",
            "nope",
            "--bundle_dir",
            str(tmp_path / "b"),
            "--index",
            str(dist / "bundle_index.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ") and "no bundle 'nope'" in bad.stderr
