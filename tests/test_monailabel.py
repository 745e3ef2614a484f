"""The MONAI Label app (apps/monailabel) served for real: ``monailabel start_server`` on 127.0.0.1 with a
datastore of sample volumes (2 labeled, 2 not), then /info, /infer, bad requests and /train over HTTP; the request
checks of :mod:`medssl.clinic.label` on their own. The app on a PACS (DICOMweb): tests/test_monailabel_pacs.py.

MONAI Label pins its own dependency set (torchvision and a CUDA build of torch), so it lives in its own
environment, ``.venv-label`` (the README's test command creates it; ``MEDSSL_LABEL_PYTHON`` may point at
another one's python).
"""

import json
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import BUNDLES, REPO, TINY, bundle_cmd, configs

from medssl.clinic.label import (
    RequestError,
    check_image_upload,
    check_name,
    check_request_paths,
    check_uid,
    prepare_models,
    publish_weights,
    read_label_upload,
    write_datastore_split,
)
from medssl.networks import VNet
from medssl.clinic.release import ReleaseError, package
from medssl.lab.sample_data import sample_data

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


def _multipart(body: bytes, content_type: str) -> dict:
    """The parts of a multipart answer (MONAI Label's ``output=all``): {file name or field name: bytes}."""
    import email
    import email.policy

    message = email.message_from_bytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body, policy=email.policy.HTTP
    )  # fmt: skip
    return {
        part.get_filename() or part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
        for part in message.iter_parts()
    }


def _call(url, method="POST", files=None, form=None, timeout=600):
    """One HTTP request, multipart when ``files`` (``{field: (filename, bytes)}``) or ``form`` are given; returns
    ``(status, body, headers)`` for any status."""
    data, headers = None, {}
    if files or form:
        boundary = uuid.uuid4().hex
        parts = []
        for name, value in (form or {}).items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        for name, (filename, content) in (files or {}).items():
            head = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            )
            parts.append(head.encode() + content + b"\r\n")
        data = b"".join(parts) + f"--{boundary}--\r\n".encode()
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def _detail(body: bytes) -> str:
    """The reason of an error answer (FastAPI's ``{"detail": ...}``), else the start of the body."""
    try:
        return str(json.loads(body).get("detail", ""))
    except (ValueError, AttributeError):
        return body[:300].decode(errors="replace")


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
def test_monailabel_serves_the_acdc_release_with_its_three_structures(acdc_dir, tmp_path):
    """The README's `--conf models acdc_seg_finetune`: pulled from the checkout's index (no bundle_index given), served
    with its three named labels, and its auto-segmentation of an ACDC validation frame is the release's: each
    structure's Dice against the reference within 0.01 of the release's recorded evaluation of that frame."""
    frame = "patient028_frame01"
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(acdc_dir / "imagesTr" / f"{frame}.nii.gz", studies / f"{frame}.nii.gz")
    app = tmp_path / "app"
    shutil.copytree(REPO / "apps" / "monailabel", app, ignore=shutil.ignore_patterns("model", "__pycache__"))
    server, base, log, info = _start_server(app, studies, tmp_path, "models", "acdc_seg_finetune")
    try:
        assert list(info["models"]) == ["acdc_seg_finetune"]
        labels = info["models"]["acdc_seg_finetune"]["labels"]
        assert labels == {"right ventricle": 1, "myocardium": 2, "left ventricle": 3}
        body, headers = _request(f"{base}/infer/acdc_seg_finetune?image={frame}&output=all", method="POST")
    finally:
        _stop_server(server, log)
    parts = _multipart(body, headers["Content-Type"])
    params = json.loads(next(v for k, v in parts.items() if k.endswith(".json") or k == "params"))
    # the volume checks ride along with the label map: every structure measured, within the training labels' range
    assert set(params["labels"]) == set(labels) and params["quality"]["verdict"] == "ok", params["quality"]
    for name, entry in params["labels"].items():
        assert entry["volume_ml"] > 0, name
    (tmp_path / "pred.nii.gz").write_bytes(next(v for k, v in parts.items() if k.endswith(".nii.gz")))
    pred = np.asarray(nib.load(tmp_path / "pred.nii.gz").dataobj)
    label = np.asarray(nib.load(acdc_dir / "labelsTr" / f"{frame}.nii.gz").dataobj)
    run = json.loads((REPO / "benchmarks" / "results" / "acdc_release_cpu" / "results.json").read_text())["runs"][0]
    recorded = next(c for c in run["cases"] if c["case"] == frame)
    for value, name in enumerate(labels, start=1):
        dice = 2 * ((pred == value) & (label == value)).sum() / ((pred == value).sum() + (label == value).sum())
        assert dice == pytest.approx(recorded[f"dice_lcc_{name.replace(' ', '_')}"], abs=0.01), name


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

        # the request's own faults get a 4xx with the reason and change nothing (MONAI Label 0.8.5: a bare 500, or 200
        # with garbage stored as the label)
        labels_dir = studies / "labels" / "final"
        before = sorted((p.name, p.read_bytes()) for p in labels_dir.iterdir()), sorted(os.listdir(studies))
        image = cases[3].read_bytes()
        truncated = image[: len(image) // 2]
        small = tmp_path / "small.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), small)
        label_id = cases[0].name[: -len(".nii.gz")]
        q = urllib.parse.quote
        for method, url, files, status, detail in (
            ("POST", "/infer/la_seg_finetune", {"file": ("scan.nii.gz", truncated)}, 422,
             "the uploaded image: not a readable NIfTI volume (EOFError: Compressed file ended"),
            ("POST", "/infer/la_seg_finetune?image=no_such_image", None, 404,
             "image 'no_such_image': no such image in the datastore."),
            ("POST", f"/infer/la_seg_finetune?image={q(str(cases[3]))}", None, 400,
             f"image: '{cases[3]}' is a path outside the datastore"),
            ("PUT", f"/datastore/label?image={label_id}&tag=final", {"label": ("l.nii.gz", b"garbage\n")}, 422,
             f"label for image '{label_id}': not a readable NIfTI volume"),
            ("PUT", f"/datastore/label?image={label_id}&tag=final", {"label": ("l.nii.gz", small.read_bytes())}, 422,
             f"label for image '{label_id}': shape (8, 8, 8) differs from its image's shape (48, 48, 32)."),
            ("PUT", f"/datastore/label?image={label_id}&tag={q('../..')}", {"label": ("l.nii.gz", image)}, 400,
             "tag '../..': expected a name"),
            ("PUT", "/datastore/image?image=new_scan", {"file": ("new_scan.nii.gz", b"garbage\n")}, 422,
             "image upload for 'new_scan': not a readable NIfTI volume"),
            ("PUT", f"/datastore/image?image={q('../outside')}", {"file": ("x.nii.gz", image)}, 400,
             "image '../outside': expected a name"),
        ):  # fmt: skip
            code, body, _ = _call(base + url, method=method, files=files, timeout=120)
            assert (code, _detail(body)[: len(detail)]) == (status, detail), (url, code, _detail(body))
        assert (sorted((p.name, p.read_bytes()) for p in labels_dir.iterdir()), sorted(os.listdir(studies))) == before

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


def test_requests_name_ids_not_paths(tmp_path):
    assert check_name("case_01.a-b", "image") == "case_01.a-b"
    for bad in ("../x", "a/b", "..", ".hidden", "", "a" * 200, None):
        with pytest.raises(RequestError, match="expected a name") as err:
            check_name(bad, "image")
        assert err.value.status == 400
    assert check_uid("1.2.840.10008.5.1.4.1.1.4", "image") == "1.2.840.10008.5.1.4.1.1.4"
    for bad in ("1..2", "12", "1.2.x", "1." + "2" * 70, "../1.2", "1.2/3"):
        with pytest.raises(RequestError, match="expected a DICOM SeriesInstanceUID"):
            check_uid(bad, "image")
    store = tmp_path / "store"
    (store / "labels").mkdir(parents=True)
    check_request_paths({"image": "case1", "device": "cpu", "result_extension": ".nii.gz", "n": 2}, [store])
    check_request_paths({"image": str(store / "labels" / "a.nii.gz")}, [store])
    for bad, field in (
        ({"image": "/etc/passwd"}, "image"),
        ({"model_filename": "../../x.pt"}, "model_filename"),
        ({"label_info": [{"name": "left atrium"}, {"file": "~/x"}]}, "label_info.1.file"),
        ({"image": str(store) + "/../x"}, "image"),
    ):
        with pytest.raises(RequestError, match=f"^{field}: .* is a path outside the datastore") as err:
            check_request_paths(bad, [store])
        assert err.value.status == 400


def test_uploads_are_checked_against_their_image(tmp_path):
    affine = np.diag([0.6, 0.6, 1.2, 1.0])
    image = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(6, 5, 4)).astype(np.float32), affine), image)
    assert check_image_upload(image) == (6, 5, 4)
    labels = np.zeros((6, 5, 4), np.uint8)
    labels[1:3, 2:4, 1] = 1
    good = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(labels, affine), good)
    back, back_affine = read_label_upload(good, image, {1: "left atrium"})
    np.testing.assert_array_equal(back, labels)
    np.testing.assert_allclose(back_affine, affine)
    raw = tmp_path / "label.bin"  # OHIF's upload: one uint8 per voxel, Fortran order
    raw.write_bytes(labels.tobytes(order="F"))
    np.testing.assert_array_equal(read_label_upload(raw, image, {1: "left atrium"})[0], labels)
    cases = {
        "garbage.nii.gz": (b"garbage", "not a readable NIfTI volume"),
        "cut.nii.gz": (good.read_bytes()[:-20], "not a readable NIfTI volume"),
        "short.bin": (b"\0" * 7, "7 bytes, expected 120 (one uint8 per voxel of (6, 5, 4))"),
    }
    for name, (content, reason) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(RequestError, match=re.escape(reason)) as err:
            read_label_upload(tmp_path / name, image, {1: "left atrium"})
        assert err.value.status == 422
    for array, aff, reason in (
        (np.zeros((6, 5, 3), np.uint8), affine, "shape (6, 5, 3) differs from its image's shape (6, 5, 4)"),
        (labels, np.eye(4), "affine"),
        (labels * 2, affine, "values [2] are not labels of the served models {1: 'left atrium'} (or 0)"),
        (labels + 0.5, affine, "values must be integer label values"),
    ):
        bad = tmp_path / "bad.nii.gz"
        nib.save(nib.Nifti1Image(array, aff), bad)
        with pytest.raises(RequestError, match=re.escape(reason)):
            read_label_upload(bad, image, {1: "left atrium"})
    for name, content, reason in (
        ("scan.txt", b"x", "expected a NIfTI volume (.nii or .nii.gz)"),
        ("scan.nii.gz", image.read_bytes()[:-30], "not a readable NIfTI volume"),
    ):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(RequestError, match=re.escape(reason)):
            check_image_upload(tmp_path / name)
