"""pcrl_pretrain through ``python -m monai.bundle``: the contract pieces that apply to a pre-training bundle,
the checkpoint contents, weight transfer into the segmentation bundles, and the issue's acceptance command."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import BUNDLES, bundle_cmd, configs

from medssl.networks import VNet
from medssl.lab.sample_data import sample_data

NAME = "pcrl_pretrain"
SMALL = ["--patch_size", "[32,32,32]", "--num_workers", "0", "--batch_size", "2", "--queue_size", "64"]


@pytest.fixture(scope="module")
def data(module_tmp):
    out = sample_data(module_tmp("sample"), num_cases=4, shape=(48, 48, 32), num_test=1)
    d = json.loads((out / "dataset.json").read_text())
    for entry in d["training"]:
        entry["label"] = "labelsTr/never_read.nii.gz"  # pre-training never loads labels
    (out / "dataset.json").write_text(json.dumps(d))
    return out


@pytest.fixture(scope="module")
def trained(data, module_tmp):
    root = module_tmp("pcrl")
    proc = bundle_cmd(
        "run",
        "--config_file",
        configs(NAME, "train"),
        "--bundle_root",
        root,
        "--dataset_dir",
        data,
        "--max_iterations",
        2,
        "--save_interval",
        1,
        *SMALL,
    )
    return root, proc.stdout


def test_train_logs_and_checkpoint(trained):
    root, log = trained
    for term in ["loss_contrast", "loss_recon", "loss_recon_hybrid", "loss_recon_mixed", "loss_recon_mixed_hybrid"]:
        assert f"{term}: " in log, term
    c1 = torch.load(root / "models" / "checkpoint_1.pt", weights_only=True)
    c2 = torch.load(root / "models" / "checkpoint_2.pt", weights_only=True)
    assert set(c2) == {"model", "teacher", "loss", "optimizer", "lr_scheduler", "trainer", "rng"}
    assert int(c1["loss"]["contrast.queue_ptr"]) == 6 and int(c2["loss"]["contrast.queue_ptr"]) == 12  # 3 x batch 2
    for k, v in c2["teacher"].items():  # key encoder = 0.999 EMA of the student, from the first step (no warm-up)
        if k.endswith(("weight", "bias")) and "running" not in k and k in dict(VNet().named_parameters()):
            torch.testing.assert_close(v, 0.999 * c1["teacher"][k] + 0.001 * c2["model"][k], rtol=1e-5, atol=1e-6)


def test_weights_transfer_into_every_segmentation_bundle(trained, data, tmp_path):
    """All backbone tensors of the pre-trained model are matched and equal after loading into la_seg_finetune."""
    root, _ = trained
    weights = torch.load(root / "models" / "model.pt", weights_only=True)
    backbone = VNet().state_dict()
    assert set(backbone) <= set(weights)
    from medssl.networks import load_pretrained

    for kwargs in ({}, {"proj_dim": 64}, {"proj_dim": 64, "sdm_head": True}):  # la_seg / cvrl / simcvd students
        net = load_pretrained(VNet(**kwargs), str(root / "models" / "model.pt"))
        for k in backbone:
            assert torch.equal(net.state_dict()[k], weights[k]), k
    labeled = sample_data(tmp_path / "labeled", num_cases=3, shape=(32, 32, 32), num_test=1)
    proc = bundle_cmd(
        "run",
        "--config_file",
        configs("la_seg_finetune", "train"),
        "--bundle_root",
        tmp_path,
        "--dataset_dir",
        labeled,
        "--num_labeled",
        1,
        "--max_iterations",
        1,
        "--save_interval",
        0,
        "--pretrained_ckpt",
        root / "models" / "model.pt",
        "--patch_size",
        "[32,32,32]",
        "--num_workers",
        0,
        "--batch_size",
        2,
    )
    extra = len(weights) - len(backbone)
    assert f"{len(backbone)} tensors matched, 0 missing, {extra} unexpected, 0 with another shape" in proc.stdout


def test_inference_reconstructs_in_input_geometry(trained, data, tmp_path):
    root, _ = trained
    bundle_cmd(
        "run",
        "--config_file",
        configs(NAME, "inference"),
        "--bundle_root",
        root,
        "--dataset_dir",
        data,
        "--patch_size",
        "[32,32,32]",
        "--num_workers",
        0,
        "--output_dir",
        tmp_path,
    )
    image = nib.load(data / "imagesTr" / "sample_003.nii.gz")
    recon = nib.load(tmp_path / "sample_003_recon.nii.gz")
    assert recon.shape == image.shape and recon.get_data_dtype() == np.float32
    np.testing.assert_allclose(recon.affine, image.affine)


def test_evaluate_reports_reconstruction_error(trained, data):
    root, _ = trained
    proc = bundle_cmd(
        "run", "--config_file", configs(NAME, "train", "evaluate"), "--bundle_root", root, "--dataset_dir", data, *SMALL
    )
    assert "reconstruction_mse" in proc.stdout
    assert (root / "eval" / "reconstruction_mse_raw.csv").is_file()


def test_ckpt_export_torchscript_equals_eager(trained, tmp_path):
    from medssl.networks import PCRLNet

    root, _ = trained
    ts = tmp_path / "model.ts"
    bundle_cmd(
        "ckpt_export",
        "network_def",
        "--filepath",
        ts,
        "--ckpt_file",
        root / "models" / "model.pt",
        "--meta_file",
        BUNDLES / NAME / "configs" / "metadata.json",
        "--config_file",
        configs(NAME, "inference"),
        "--bundle_root",
        root,
    )
    eager = PCRLNet().eval()
    eager.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(ts))(x), eager(x), rtol=1e-5, atol=1e-5)


def test_acceptance_command_on_real_la(la_dir, tmp_path):
    """The issue's acceptance command, verbatim but for bundle_root."""
    proc = bundle_cmd(
        "run",
        "--config_file",
        "bundles/pcrl_pretrain/configs/train.json",
        "--dataset_dir",
        la_dir,
        "--patch_size",
        "[32,32,32]",
        "--max_iterations",
        2,
        "--bundle_root",
        tmp_path,
    )
    assert "Iter: 2/2" in proc.stdout and (tmp_path / "models" / "model.pt").is_file()
