"""Several classes through the semi-supervised bundles: cvrl_semisup and simcvd_distill train with ``--num_classes 4``
on a four-class set (the CT set of issue 29 crashed both: the contour term and the SDM were class 1 only)."""

import json

import nibabel as nib
import numpy as np
import pytest
from helpers import TINY, bundle_cmd, configs

from medssl.lab.sample_data import sample_data


@pytest.fixture(scope="module")
def four_class_dir(module_tmp):
    """The synthetic atrium set with its structure cut into three classes along x (1, 2, 3 from left to right);
    the last two training cases are unlabeled."""
    out = sample_data(module_tmp("four"), num_cases=5, shape=(48, 48, 32), num_test=1)
    d = json.loads((out / "dataset.json").read_text())
    for entry in d["training"] + d.get("test", []):
        path = out / entry["label"]
        img = nib.load(path)
        label = np.asarray(img.dataobj).astype(np.uint8)
        xs = np.nonzero(label.any(axis=(1, 2)))[0]
        cuts = np.linspace(xs.min(), xs.max() + 1, 4).astype(int)
        for c in (2, 3):
            label[cuts[c - 1] :][label[cuts[c - 1] :] > 0] = c
        assert set(np.unique(label)) == {0, 1, 2, 3}, path
        nib.save(nib.Nifti1Image(label, img.affine, img.header), path)
    for entry in d["training"][2:]:
        entry["label"] = "labelsTr/no_such_label.nii.gz"
    (out / "dataset.json").write_text(json.dumps(d))
    return out


@pytest.mark.parametrize(
    "bundle, terms",
    [
        ("cvrl_semisup", ["loss_sup", "loss_contour", "loss_global", "loss_local", "loss_consistency"]),
        ("simcvd_distill", ["loss_seg", "loss_sdm", "loss_contrast", "loss_distill", "loss_consistency"]),
    ],
)
def test_semi_supervised_bundles_train_four_classes(bundle, terms, four_class_dir, module_tmp):
    root = module_tmp(bundle)
    proc = bundle_cmd(
        "run", "--config_file", configs(bundle, "train"), "--bundle_root", root, "--dataset_dir", four_class_dir,
        "--num_labeled", 2, "--num_classes", 4, "--max_iterations", 2, "--save_interval", 1, *TINY,
    )  # fmt: skip
    assert (root / "models" / "model.pt").is_file()
    for term in terms:
        lines = [line for line in proc.stdout.splitlines() if f"{term}: " in line]
        values = [float(line.split(f"{term}: ")[1].split()[0]) for line in lines]
        assert values and all(np.isfinite(values)), (term, values)
