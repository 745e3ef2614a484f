"""cvrl_semisup specifics: the two streams inside the bundle, the EMA teacher and queue in the checkpoint,
weights moving in from la_seg_finetune, and the issue's acceptance command on real LA data."""

import json

import pytest
import torch
from helpers import TINY, bundle_cmd, configs

from medssl.networks import VNet
from medssl.lab.sample_data import sample_data

NAME = "cvrl_semisup"


@pytest.fixture(scope="module")
def sample_dir(module_tmp):
    """4 training cases: the last two are unlabeled and their label paths point at files that do not exist."""
    out = sample_data(module_tmp("sample"), num_cases=5, shape=(48, 48, 32), num_test=1)
    d = json.loads((out / "dataset.json").read_text())
    for entry in d["training"][2:]:
        entry["label"] = "labelsTr/no_such_label.nii.gz"
    (out / "dataset.json").write_text(json.dumps(d))
    return out


@pytest.fixture(scope="module")
def trained(sample_dir, module_tmp):
    root = module_tmp("cvrl")
    proc = bundle_cmd(
        "run",
        "--config_file",
        configs(NAME, "train"),
        "--bundle_root",
        root,
        "--dataset_dir",
        sample_dir,
        "--num_labeled",
        2,
        "--max_iterations",
        2,
        "--save_interval",
        1,
        *TINY,
    )
    return root, proc.stdout


def test_unlabeled_labels_are_never_read(trained):
    """Training succeeded although the unlabeled entries' label files do not exist."""
    root, log = trained
    assert (root / "models" / "model.pt").is_file()
    for term in ["loss_sup", "loss_consistency", "loss_global", "loss_local", "loss_contour", "weight_rampup"]:
        assert f"{term}: " in log, term


def test_checkpoint_holds_teacher_queue_and_ema_relation(trained):
    root, _ = trained
    c1 = torch.load(root / "models" / "checkpoint_1.pt", weights_only=True)
    c2 = torch.load(root / "models" / "checkpoint_2.pt", weights_only=True)
    assert set(c2) == {"model", "teacher", "loss", "optimizer", "lr_scheduler", "trainer", "rng"}
    # the global contrast's queue advanced by the 2 unlabeled volumes of each iteration
    assert int(c1["loss"]["global_contrast.queue_ptr"]) == 2 and int(c2["loss"]["global_contrast.queue_ptr"]) == 4
    params = [k for k, v in VNet(proj_dim=64).named_parameters()]
    for k in params:
        # first update: a = min(1 - 1/1, 0.99) = 0, the teacher is the student; second: a = 0.5
        torch.testing.assert_close(c1["teacher"][k], c1["model"][k], rtol=0, atol=0)
        torch.testing.assert_close(c2["teacher"][k], 0.5 * c1["teacher"][k] + 0.5 * c2["model"][k])
    final = torch.load(root / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("proj_head") for k in final)  # heads stay out of the released weights
    assert any(k.startswith("proj_head") for k in c2["model"])


def test_pretrained_from_la_seg_finetune(trained, sample_dir, tmp_path):
    """Weights move between bundles: la_seg_finetune-shaped weights initialise cvrl_semisup's student."""
    root, _ = trained
    proc = bundle_cmd(
        "run",
        "--config_file",
        configs(NAME, "train"),
        "--bundle_root",
        tmp_path,
        "--dataset_dir",
        sample_dir,
        "--num_labeled",
        2,
        "--max_iterations",
        1,
        "--save_interval",
        0,
        "--pretrained_ckpt",
        root / "models" / "model.pt",
        *TINY,
    )
    n = len(VNet().state_dict())
    assert f"{n} tensors matched, 4 missing, 0 unexpected, 0 with another shape" in proc.stdout  # the proj head


def test_no_unlabeled_volumes_is_a_clear_error(tmp_path):
    data = sample_data(tmp_path / "data", num_cases=3, shape=(32, 32, 32), num_test=1)
    proc = bundle_cmd(
        "run",
        "--config_file",
        configs(NAME, "train"),
        "--bundle_root",
        tmp_path,
        "--dataset_dir",
        data,
        "--num_labeled",
        2,
        "--max_iterations",
        1,
        *TINY,
        check=False,
    )
    assert proc.returncode != 0
    assert "leaving 0 unlabeled; semi-supervised training needs at least 1 unlabeled volume(s)" in proc.stdout


def test_acceptance_command_on_real_la(la_dir, tmp_path):
    """The issue's acceptance command, verbatim but for bundle_root."""
    proc = bundle_cmd(
        "run",
        "--config_file",
        "bundles/cvrl_semisup/configs/train.json",
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
