"""The releases committed under releases/ and listed in bundle_index.json: pulled offline with checksum checks,
model-zoo's local verifier checks on the pulled bundle (verify_metadata, verify_net_in_out, ckpt_export), weights
loading strictly into each bundle's network_def, float16 storage, and the size limits."""

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import REPO, bundle_cmd

from medssl.clinic.release import ReleaseError, pull

INDEX = json.loads((REPO / "bundle_index.json").read_text())
RELEASES = sorted(INDEX)
MB = 1000 * 1000


def _name(key):
    return key.rsplit("_v", 1)[0]


@pytest.fixture(scope="module")
def pulled(module_tmp):
    """Every release pulled from the committed index (sha256 verified; model.ts exported at pull time)."""
    target = module_tmp("pulled")
    return {key: pull(_name(key), bundle_dir=str(target), index=str(REPO / "bundle_index.json")) for key in RELEASES}


def test_committed_release_bytes_within_limits():
    sizes = {key: (REPO / INDEX[key]["source"]).stat().st_size for key in RELEASES}
    assert all(s <= 25 * MB for s in sizes.values()), sizes  # model-zoo's limit for a file in its repository
    # the device tool sends the whole tree (64 MiB = 67.1 MB): three releases of about 17 MB leave 15 MB for the rest
    assert sum(sizes.values()) <= 53 * MB, sizes
    assert {"la_seg_finetune", "acdc_seg_finetune"} <= {_name(k) for k in RELEASES}


@pytest.mark.parametrize("key", RELEASES)
def test_release_weights_load_strictly_and_are_float16(key, pulled):
    from monai.bundle import ConfigParser

    root = pulled[key]
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    state = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    net.load_state_dict(state, strict=True)  # float16 values land in the float32 network
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert all(torch.isfinite(v.float()).all() for v in state.values() if v.is_floating_point())
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert key.endswith(f"_v{meta['version']}") and meta["version"] in meta["changelog"]
    assert isinstance(meta["eval_metrics"].get("mean_dice"), float), "a release states its dev-split figure"


@pytest.mark.parametrize("key", RELEASES)
def test_model_zoo_local_checks_on_the_pulled_release(key, pulled, schema_path, tmp_path):
    root = pulled[key]
    meta, inference = root / "configs" / "metadata.json", root / "configs" / "inference.json"
    assert (
        "verified with no error" in bundle_cmd("verify_metadata", "--meta_file", meta, "--filepath", schema_path).stdout
    )
    proc = bundle_cmd("verify_net_in_out", "network_def", "--meta_file", meta, "--config_file", inference,
                      "--n", 2, "--device", "cpu", "--bundle_root", root)  # fmt: skip
    assert "data shape of network is verified with no error" in proc.stdout
    ts = tmp_path / "model.ts"
    bundle_cmd("ckpt_export", "network_def", "--filepath", ts, "--ckpt_file", root / "models" / "model.pt",
               "--meta_file", meta, "--config_file", inference, "--bundle_root", root)  # fmt: skip
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(inference))
    eager = parser.get_parsed_content("network_def").eval()
    eager.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    x = torch.randn(1, 1, 32, 48, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for scripted in (torch.jit.load(str(ts)), torch.jit.load(str(root / "models" / "model.ts"))):
            out, ref = scripted(x), eager(x)
            ref = ref[0] if isinstance(ref, (tuple, list)) else ref
            out = out[0] if isinstance(out, (tuple, list)) else out
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_pull_refuses_a_modified_release_and_leaves_nothing(tmp_path):
    key = RELEASES[0]
    mirror = tmp_path / "mirror"
    (mirror / "releases").mkdir(parents=True)
    zip_path = mirror / INDEX[key]["source"]
    data = bytearray((REPO / INDEX[key]["source"]).read_bytes())
    with zipfile.ZipFile(REPO / INDEX[key]["source"]) as zf:  # change one byte of the stored weights
        info = zf.getinfo(f"{_name(key)}/models/model.pt")
    data[info.header_offset + 200] ^= 0xFF
    zip_path.write_bytes(bytes(data))
    shutil.copy(REPO / "bundle_index.json", mirror / "bundle_index.json")
    with pytest.raises(ReleaseError, match="does not match the index"):
        pull(_name(key), bundle_dir=str(tmp_path / "out"), index=str(mirror / "bundle_index.json"))
    assert not any((tmp_path / "out").iterdir())


def test_float16_rounding_keeps_the_label_map(la_dir, pulled):
    """Weights with float32 detail (the release plus noise below float16's resolution elsewhere) and their float16
    rounding give the same label map of a real LA crop: storing releases in float16 costs nothing visible."""
    from medssl.networks import VNet

    root = pulled[next(k for k in RELEASES if k.startswith("la_seg_finetune"))]
    state = {k: v.float() for k, v in torch.load(root / "models" / "model.pt", weights_only=True).items()}
    g = torch.Generator().manual_seed(0)
    fp32 = {k: (v + v.abs() * 4e-4 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
            for k, v in state.items()}  # fmt: skip
    fp16 = {k: v.half() if v.is_floating_point() else v for k, v in fp32.items()}
    case = (la_dir / "train.list").read_text().split()[60]
    image = np.asanyarray(nib.load(la_dir / "imagesTr" / f"{case}.nii.gz").dataobj, dtype=np.float32)
    image = (image - image.mean()) / image.std()
    c = [s // 2 for s in image.shape]
    crop = image[c[0] - 56 : c[0] + 56, c[1] - 56 : c[1] + 56, c[2] - 40 : c[2] + 40]
    x = torch.from_numpy(np.ascontiguousarray(crop))[None, None]
    maps = []
    for weights in (fp32, fp16):
        net = VNet().eval()
        net.load_state_dict(weights)
        with torch.no_grad():
            maps.append(net(x).argmax(1))
    a, b = maps[0].bool(), maps[1].bool()
    assert a.sum() > 1000  # the atrium is in the crop
    assert 2 * (a & b).sum().item() / (a.sum() + b.sum()).item() > 0.999


def test_large_files_yml_lists_every_release_with_its_sha256():
    text = (REPO / "releases" / "large_files.yml").read_text()
    for key in RELEASES:
        data = (REPO / INDEX[key]["source"]).read_bytes()
        assert f'path: "{INDEX[key]["source"]}"' in text
        assert hashlib.sha256(data).hexdigest() == INDEX[key]["sha256"]
        assert f'hash_val: "{INDEX[key]["sha256"]}"' in text


def test_readme_pull_command_uses_the_committed_index(tmp_path):
    """`python -m medssl pull la_seg_finetune --bundle_dir bundles_pulled` (README), run from another folder."""
    proc = subprocess.run([sys.executable, "-m", "medssl", "pull", "la_seg_finetune", "--bundle_dir", "bundles_pulled"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    key = next(k for k in RELEASES if k.startswith("la_seg_finetune"))
    folder = tmp_path / "bundles_pulled" / key
    assert proc.stdout.strip().endswith(key) and (folder / "models" / "model.ts").is_file()


def _large_files(path):
    import yaml

    return {e["path"]: e for e in yaml.safe_load(path.read_text())["large_files"]}


@pytest.mark.parametrize("bundle", sorted(p.name for p in (REPO / "bundles").iterdir() if p.is_dir()))
def test_bundle_large_files_match_the_index(bundle):
    """Every bundle has model-zoo's large_files.yml: a released one lists models/model.pt (the zip's member, byte for
    byte, with the sha256 the index records for its newest release) and models/model.ts (made at pull time, no
    hash); an unreleased one none."""
    listed = _large_files(REPO / "bundles" / bundle / "large_files.yml")
    keys = [k for k in RELEASES if _name(k) == bundle]
    if not keys:
        assert listed == {}, f"{bundle} has no release but its large_files.yml lists {sorted(listed)}"
        return
    key = max(keys, key=lambda k: [int(p) for p in k.rsplit("_v", 1)[1].split(".")])
    files = INDEX[key]["files"]
    assert set(listed) == {"models/model.pt", "models/model.ts"} and set(files) == {"models/model.pt"}
    pt = listed["models/model.pt"]
    assert pt["hash_type"] == "sha256" and pt["hash_val"] == files["models/model.pt"]["sha256"]
    assert pt["url"] == files["models/model.pt"]["url"] and pt["url"].endswith(f"/{key}/model.pt")
    # model.ts is made at pull time: TorchScript bytes are not reproducible, so no hash is promised
    assert listed["models/model.ts"]["hash_val"] == "" and listed["models/model.ts"]["url"].endswith(f"/{key}/model.ts")
    with zipfile.ZipFile(REPO / INDEX[key]["source"]) as zf:
        member = zf.read(f"{bundle}/models/model.pt")
        assert hashlib.sha256(member).hexdigest() == files["models/model.pt"]["sha256"]
        # the zip carries the same large_files.yml as the source bundle
        assert zf.read(f"{bundle}/large_files.yml") == (REPO / "bundles" / bundle / "large_files.yml").read_bytes()


def test_committed_release_files_are_never_rewritten():
    """A release zip, once committed, is never modified: a new version is a new file (and the old one deleted)."""
    if not (REPO / ".git").exists():
        pytest.skip(f"{REPO} is not a git checkout: no history to check")
    committed = sorted(Path(INDEX[k]["source"]).name for k in RELEASES)
    assert sorted(p.name for p in (REPO / "releases").glob("*.zip")) == committed  # no stray release files
    for name in committed:
        log = subprocess.run(["git", "log", "--format=%h %s", "--diff-filter=M", "--", f"releases/{name}"],
                             cwd=REPO, capture_output=True, text=True)  # fmt: skip
        assert log.returncode == 0, log.stderr
        assert log.stdout.strip() == "", f"releases/{name} was rewritten after it was committed:\n{log.stdout}"
