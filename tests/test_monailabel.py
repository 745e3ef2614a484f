"""The MONAI Label app (apps/monailabel) served for real: ``monailabel start_server`` on 127.0.0.1 with a
datastore of sample volumes (2 labeled, 2 not), then /info, /infer and /train over HTTP.

MONAI Label pins its own dependency set (torchvision and a CUDA build of torch), so it lives in its own
environment, ``.venv-label`` (the README's test command creates it; ``MEDSSL_LABEL_PYTHON`` may point at
another one's python).
"""

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import BUNDLES, REPO, TINY, bundle_cmd, configs

from medssl.label import prepare_models, publish_weights, write_datastore_split
from medssl.networks import VNet
from medssl.release import ReleaseError, package
from medssl.sample_data import sample_data

LABEL_PYTHON = Path(os.environ.get("MEDSSL_LABEL_PYTHON", REPO / ".venv-label" / "bin" / "python"))
needs_label_env = pytest.mark.skipif(
    not LABEL_PYTHON.is_file(),
    reason=f"no MONAI Label environment at {LABEL_PYTHON}: create it as the README's test command does "
    '(python3 -m venv .venv-label && .venv-label/bin/pip install -c constraints-label.txt -e ".[label]")',
)


def test_write_datastore_split_orders_labeled_first(tmp_path):
    out, n = write_datastore_split(
        tmp_path / "run",
        [{"image": "/a.nii.gz", "label": "/la.nii.gz"}],
        ["/b.nii.gz", "/c.nii.gz"],
        [{"image": "/v.nii.gz", "label": "/lv.nii.gz"}],
    )
    split = json.loads((out / "dataset.json").read_text())
    assert n == 1
    assert split["training"] == [
        {"image": "/a.nii.gz", "label": "/la.nii.gz"},
        {"image": "/b.nii.gz"},
        {"image": "/c.nii.gz"},
    ]
    assert split["validation"] == [{"image": "/v.nii.gz", "label": "/lv.nii.gz"}]
    with pytest.raises(ValueError, match="no labeled image"):
        write_datastore_split(tmp_path / "none", [], ["/b.nii.gz"])
    with pytest.raises(ValueError, match=r"entry 0 must have 'image' and 'label'"):
        write_datastore_split(tmp_path / "bad", [{"image": "/a.nii.gz"}])


def test_prepare_models_copies_once_and_publish_is_atomic(tmp_path):
    models = prepare_models(tmp_path / "model", ["la_seg_finetune"])
    target = models["la_seg_finetune"]
    assert (target / "configs" / "inference.json").read_bytes() == (
        BUNDLES / "la_seg_finetune" / "configs" / "inference.json"
    ).read_bytes()
    (target / "configs" / "marker").write_text("kept")
    assert prepare_models(tmp_path / "model", ["la_seg_finetune"])["la_seg_finetune"] == target
    assert (target / "configs" / "marker").read_text() == "kept"  # an existing copy is used as it is
    with pytest.raises(ValueError, match="cannot be served"):
        prepare_models(tmp_path / "model", ["pcrl_pretrain"])
    with pytest.raises(FileNotFoundError, match="no final weights"):
        publish_weights(tmp_path / "missing.pt", target)
    src = tmp_path / "w.pt"
    torch.save({"w": torch.ones(2)}, src)
    assert publish_weights(src, target).read_bytes() == src.read_bytes()
    assert sorted(p.name for p in (target / "models").iterdir()) == ["model.pt"]  # no temp file left


def test_prepare_models_pulls_by_name_with_checksum(tmp_path):
    weights = tmp_path / "w.pt"
    torch.save(VNet().state_dict(), weights)
    dist = tmp_path / "dist"
    package("la_seg_finetune", out=str(dist), weights=str(weights), base_url="")
    index = dist / "bundle_index.json"
    target = prepare_models(tmp_path / "model", ["la_seg_finetune"], index=str(index))["la_seg_finetune"]
    pulled = torch.load(target / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(v, pulled[k]) for k, v in torch.load(weights, weights_only=True).items())
    assert (target / "models" / "model.ts").is_file()
    # a tampered release is refused and leaves no bundle folder behind
    zip_path = next(dist.glob("*.zip"))
    zip_path.write_bytes(zip_path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ReleaseError, match="does not match the index"):
        prepare_models(tmp_path / "model2", ["la_seg_finetune"], index=str(index))
    assert [p.name for p in (tmp_path / "model2").iterdir()] == []


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url, method="GET", body=None, timeout=600):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read(), r.headers


def _start_server(app, studies, tmp_path, *conf):
    """``monailabel start_server`` on a free port with ``--conf`` pairs; returns (process, base URL, log, /info)."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    pairs = [a for i in range(0, len(conf), 2) for a in ("--conf", conf[i], conf[i + 1])]
    server = subprocess.Popen(
        [str(LABEL_PYTHON), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
         "--host", "127.0.0.1", "--port", str(port), *pairs],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    info = None
    deadline = time.time() + 300
    while time.time() < deadline and server.poll() is None:
        try:
            info = json.loads(_request(f"{base}/info/", timeout=10)[0])
            break
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(2)
    if info is None:
        _stop_server(server, log)
        raise AssertionError(f"server did not answer /info/:\n{(tmp_path / 'server.log').read_text()[-6000:]}")
    return server, base, log, info


def _stop_server(server, log):
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


@needs_label_env
def test_monailabel_serves_the_released_weights_on_a_scanner_units_scan(la_dir, tmp_path):
    """``--conf bundle_index bundle_index.json`` on a fresh app: la_seg_finetune pulled from the committed release
    (checksum verified) auto-segments a real LA case in scanner-like units, in its own geometry; cvrl_semisup, not
    released, is served from the bundles folder without weights (trainable, no auto-segmentation)."""
    from medssl.geometry import write_variant

    case = (la_dir / "train.list").read_text().split()[60]
    image, label = write_variant(la_dir / "imagesTr" / f"{case}.nii.gz", la_dir / "labelsTr" / f"{case}.nii.gz",
                                 tmp_path / "clinic", "scanner_units")  # fmt: skip
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(image, studies / image.name)
    app = tmp_path / "app"
    shutil.copytree(REPO / "apps" / "monailabel", app, ignore=shutil.ignore_patterns("model", "__pycache__"))
    server, base, log, info = _start_server(app, studies, tmp_path, "models", "la_seg_finetune,cvrl_semisup",
                                            "bundle_index", str(REPO / "bundle_index.json"))  # fmt: skip
    try:
        assert list(info["models"]) == ["la_seg_finetune"]
        assert sorted(info["trainers"]) == ["cvrl_semisup", "la_seg_finetune"]
        body, _ = _request(f"{base}/infer/la_seg_finetune?image={case}&output=image", method="POST")
    finally:
        _stop_server(server, log)
    pred_path = tmp_path / "pred.nii.gz"
    pred_path.write_bytes(body)
    pred, img = nib.load(pred_path), nib.load(image)
    assert pred.shape == img.shape
    np.testing.assert_allclose(pred.affine, img.affine, atol=1e-4)
    a, b = np.asanyarray(pred.dataobj) > 0, np.asanyarray(nib.load(label).dataobj) > 0
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice > 0.88, dice  # the release trained on this case: weights, pull and geometry fit together
    assert (app / "model" / "la_seg_finetune" / ".medssl_pull.json").is_file()


@needs_label_env
def test_monailabel_server_info_infer_train(tmp_path):
    data = sample_data(tmp_path / "data", num_cases=4, shape=(48, 48, 32), num_test=0)
    cases = sorted((data / "imagesTr").glob("*.nii.gz"))
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for i, img in enumerate(cases):
        shutil.copy(img, studies / img.name)
        if i < 2:  # two labeled images, two left for the annotator (and the semi-supervised bundles)
            shutil.copy(data / "labelsTr" / img.name, studies / "labels" / "final" / img.name)
    app = tmp_path / "app"
    shutil.copytree(REPO / "apps" / "monailabel", app, ignore=shutil.ignore_patterns("model", "__pycache__"))
    # la_seg_finetune is served with weights (a 2-iteration run); cvrl_semisup starts without and is trained
    seg = prepare_models(app / "model", ["la_seg_finetune"])["la_seg_finetune"]
    bundle_cmd(
        "run",
        "--config_file",
        configs("la_seg_finetune", "train"),
        "--bundle_root",
        seg,
        "--dataset_dir",
        data,
        "--num_labeled",
        2,
        "--max_iterations",
        2,
        *TINY,
    )
    assert (seg / "models" / "model.pt").is_file()

    server, base, log, info = _start_server(app, studies, tmp_path, "models", "la_seg_finetune,cvrl_semisup")
    try:
        assert list(info["models"]) == ["la_seg_finetune"]  # cvrl_semisup has no weights yet
        assert info["models"]["la_seg_finetune"]["labels"] == {"left atrium": 1}
        assert sorted(info["trainers"]) == ["cvrl_semisup", "la_seg_finetune"]

        image_id = cases[3].name[: -len(".nii.gz")]
        body, headers = _request(f"{base}/infer/la_seg_finetune?image={image_id}&output=image", method="POST")
        pred_path = tmp_path / "pred.nii.gz"
        pred_path.write_bytes(body)
        pred = nib.load(pred_path)
        image = nib.load(cases[3])
        assert pred.shape == image.shape
        np.testing.assert_allclose(pred.affine, image.affine, atol=1e-4)
        values = np.unique(np.asanyarray(pred.dataobj))
        assert set(values.tolist()) <= {0, 1}

        # the request's own faults get a 4xx with the reason, not a bare 500 (MONAI Label's default)
        cut = tmp_path / "cut.nii.gz"  # a path, as MONAI Label accepts besides image ids; the datastore stays clean
        cut.write_bytes(cases[3].read_bytes()[: cases[3].stat().st_size // 2])
        for image, status, detail in (
            (urllib.parse.quote(str(cut)), 422, f"{cut}: not a readable NIfTI volume (EOFError: Compressed file ended"),
            ("no_such_image", 404, "image 'no_such_image': no such image in the datastore."),
        ):
            with pytest.raises(urllib.error.HTTPError) as err:
                _request(f"{base}/infer/la_seg_finetune?image={image}&output=image", method="POST")
            assert err.value.code == status and json.loads(err.value.read())["detail"].startswith(detail)

        params = {"max_iterations": 2, "patch_size": [32, 32, 32], "num_workers": 0, "val_split": 0.0,
                  "device": "cpu", "multi_gpu": False}  # fmt: skip
        result = json.loads(_request(f"{base}/train/cvrl_semisup?run_sync=true", "POST", params)[0])
        assert result, "empty /train answer"
    finally:
        _stop_server(server, log)
    cvrl = app / "model" / "cvrl_semisup"
    runs = sorted((cvrl / "monailabel").iterdir())
    assert len(runs) == 1, runs
    split = json.loads((runs[0] / "dataset.json").read_text())
    assert [("label" in e) for e in split["training"]] == [True, True, False, False]  # 2 labeled + 2 unlabeled
    weights = torch.load(cvrl / "models" / "model.pt", weights_only=True)
    assert weights.keys() == torch.load(runs[0] / "models" / "model.pt", weights_only=True).keys()
    VNet().load_state_dict(weights)  # the published weights are a plain VNet's
    server_log = (tmp_path / "server.log").read_text()
    assert "training on 2 labeled and 2 unlabeled images" in server_log
    assert "Iter: 2/2" in server_log and "saved final weights (iteration 2)" in server_log


def test_request_keys_are_stashed_and_restored():
    """MONAI Label's "image_path" would be taken for the image's metadata by Spacingd; the app moves it aside."""
    from medssl.label import StashRequestKeys

    data = {"image": "/s/a.nii.gz", "image_path": "/s/a.nii.gz", "model": "m"}
    stashed = StashRequestKeys()(data)
    assert "image_path" not in stashed and stashed["medssl_stashed_image_path"] == "/s/a.nii.gz"
    assert StashRequestKeys(restore=True)(stashed) == data
