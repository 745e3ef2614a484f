"""spark_pretrain through ``python -m monai.bundle``: the checkpoint, resume pieces, what the weights give the other
bundles (the encoder, not the decoder), inference and evaluation, metadata, and the issue's acceptance command."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import bundle_cmd, configs

from medssl.networks import VNet, load_pretrained
from medssl.lab.sample_data import sample_data

NAME = "spark_pretrain"
SMALL = ["--patch_size", "[32,32,32]", "--num_workers", "0", "--batch_size", "2"]


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
    root = module_tmp("spark")
    proc = bundle_cmd(
        "run", "--config_file", configs(NAME, "train"), "--bundle_root", root, "--dataset_dir", data,
        "--max_iterations", 3, "--save_interval", 1, *SMALL,
    )  # fmt: skip
    return root, proc.stdout


def test_train_logs_checkpoint_and_schedule(trained):
    root, log = trained
    assert log.count("loss_masked_mse: ") == 3
    c3 = torch.load(root / "models" / "checkpoint_3.pt", weights_only=True)
    assert set(c3) == {"model", "optimizer", "lr_scheduler", "trainer", "rng"}
    assert c3["trainer"]["iteration"] == 3
    # AdamW (betas 0.9 / 0.95, weight decay 0.04) with a linear warm-up of max(1, 3 // 20) = 1 step, then cosine
    group = c3["optimizer"]["param_groups"][0]
    assert group["betas"] == (0.9, 0.95) and group["weight_decay"] == 0.04
    assert c3["lr_scheduler"]["warmup_steps"] == 1 and c3["lr_scheduler"]["t_total"] == 3
    weights = torch.load(root / "models" / "model.pt", weights_only=True)
    assert any(k.startswith("spark_decoder.") for k in weights)  # the whole pre-training network, for inference
    torch.testing.assert_close(weights["encoder.0.0.weight"], c3["model"]["encoder.0.0.weight"])


def test_encoder_transfers_decoder_does_not(trained, data, tmp_path):
    """Every encoder tensor is matched and equal after loading into la_seg_finetune, cvrl and simcvd students; their
    decoders, output and heads keep their own initialisation (SparK's decoder learnt to fill mask tokens)."""
    root, _ = trained
    path = str(root / "models" / "model.pt")
    weights = torch.load(path, weights_only=True)
    encoder = [k for k in VNet().state_dict() if k.startswith("encoder.")]
    for kwargs in ({}, {"proj_dim": 64}, {"proj_dim": 64, "sdm_head": True}):
        torch.manual_seed(0)
        fresh = VNet(**kwargs).state_dict()
        torch.manual_seed(0)
        net = load_pretrained(VNet(**kwargs), path).state_dict()
        for k in encoder:
            assert torch.equal(net[k], weights[k]), k
        for k in fresh:
            if not k.startswith("encoder."):
                assert torch.equal(net[k], fresh[k]), k
    labeled = sample_data(tmp_path / "labeled", num_cases=3, shape=(32, 32, 32), num_test=1)
    proc = bundle_cmd(
        "run", "--config_file", configs("la_seg_finetune", "train"), "--bundle_root", tmp_path, "--dataset_dir",
        labeled, "--num_labeled", 1, "--max_iterations", 1, "--save_interval", 0, "--pretrained_ckpt", path,
        "--patch_size", "[32,32,32]", "--num_workers", 0, "--batch_size", 2,
    )  # fmt: skip
    missing = len(VNet().state_dict()) - len(encoder)
    unexpected = len(weights) - len(encoder)
    assert f"{len(encoder)} tensors matched, {missing} missing, {unexpected} unexpected, 0 with another shape" in (
        proc.stdout
    )


def test_inference_reconstructs_in_input_geometry(trained, data, tmp_path):
    root, _ = trained
    bundle_cmd(
        "run", "--config_file", configs(NAME, "inference"), "--bundle_root", root, "--dataset_dir", data,
        "--patch_size", "[32,32,32]", "--num_workers", 0, "--output_dir", tmp_path,
    )  # fmt: skip
    image = nib.load(data / "imagesTr" / "sample_003.nii.gz")
    recon = nib.load(tmp_path / "sample_003_recon.nii.gz")
    assert recon.shape == image.shape and recon.get_data_dtype() == np.float32
    np.testing.assert_allclose(recon.affine, image.affine)
    assert np.isfinite(recon.get_fdata()).all()


def test_evaluate_reports_reconstruction_error(trained, data):
    root, _ = trained
    proc = bundle_cmd(
        "run", "--config_file", configs(NAME, "train", "evaluate"), "--bundle_root", root, "--dataset_dir", data, *SMALL
    )
    assert "reconstruction_mse" in proc.stdout
    rows = (root / "eval" / "reconstruction_mse_raw.csv").read_text().strip().splitlines()
    assert len(rows) == 2 and float(rows[1].split(",")[1]) > 0  # the one test case, some error in hidden cells


def test_acceptance_command_on_real_la(la_dir, tmp_path):
    """The issue's acceptance command, verbatim but for bundle_root; la_seg_finetune then loads its weights."""
    proc = bundle_cmd(
        "run", "--config_file", "bundles/spark_pretrain/configs/train.json", "--dataset_dir", la_dir,
        "--patch_size", "[32,32,32]", "--max_iterations", 2, "--bundle_root", tmp_path,
    )  # fmt: skip
    assert "Iter: 2/2" in proc.stdout and (tmp_path / "models" / "model.pt").is_file()
    net = load_pretrained(VNet(), str(tmp_path / "models" / "model.pt"))
    weights = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert torch.equal(net.state_dict()["encoder.4.convs.6.weight"], weights["encoder.4.convs.6.weight"])
