"""simcvd_distill specifics: the SDM reaches the objective, heads stay out of the released weights, and the
issue's acceptance command on real LA data."""

import torch
from helpers import TINY, bundle_cmd, configs

from medssl.networks import VNet
from medssl.lab.sample_data import sample_data

NAME = "simcvd_distill"


def test_sample_run_terms_checkpoint_and_weights(tmp_path):
    data = sample_data(tmp_path / "data", num_cases=5, shape=(48, 48, 32), num_test=1)
    root = tmp_path / "bundle"
    proc = bundle_cmd(
        "run",
        "--config_file",
        configs(NAME, "train"),
        "--bundle_root",
        root,
        "--dataset_dir",
        data,
        "--num_labeled",
        2,
        "--max_iterations",
        2,
        "--save_interval",
        2,
        *TINY,
    )
    for term in ["loss_seg", "loss_sdm", "loss_contrast", "loss_distill", "loss_consistency", "weight_rampup"]:
        assert f"{term}: " in proc.stdout, term
    ckpt = torch.load(root / "models" / "checkpoint_2.pt", weights_only=True)
    assert set(ckpt) == {"model", "teacher", "loss", "optimizer", "lr_scheduler", "trainer", "rng"}
    assert {"sdm_conv.weight", "proj_head.0.weight"} <= set(ckpt["model"]) and "sdm_conv.weight" in ckpt["teacher"]
    final = torch.load(root / "models" / "model.pt", weights_only=True)
    VNet().load_state_dict(final, strict=True)  # segmentation backbone only: the SDM head is not deployed


def test_acceptance_command_on_real_la(la_dir, tmp_path):
    """The issue's acceptance command, verbatim but for bundle_root."""
    proc = bundle_cmd(
        "run",
        "--config_file",
        "bundles/simcvd_distill/configs/train.json",
        "--dataset_dir",
        la_dir,
        "--num_labeled",
        8,
        "--patch_size",
        "[32,32,32]",
        "--max_iterations",
        2,
        "--bundle_root",
        tmp_path,
    )
    assert "Iter: 2/2" in proc.stdout and (tmp_path / "models" / "model.pt").is_file()
