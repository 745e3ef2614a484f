"""Any scan, any geometry: one preprocessing per bundle (RAS, ``spacing``, per-volume z-score) shared by train,
evaluate, inference and MONAI Label; predictions come back in the input's own grid; a real LA case handed over as
a clinic would gives the same segmentation; bad geometry is refused with the file named."""


from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import BUNDLES, bundle_cmd, configs
from monai.bundle import ConfigParser
from scipy import ndimage

from medssl.data import DataError, check_headers, resampled_shape, write_nifti
from medssl.geometry import VARIANTS, write_variant
from medssl.metrics import case_metrics

SEGMENTATION = ["la_seg_finetune", "cvrl_semisup", "simcvd_distill"]
ALL = SEGMENTATION + ["pcrl_pretrain", "spark_pretrain"]


def _parser(bundle, *names, **overrides):
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / f"{n}.json") for n in names])
    parser.update(overrides)
    return parser


def _describe(compose):
    """What a resolved transform list does: class, keys and every setting that changes data."""
    out = []
    for t in compose.transforms:
        d = {"class": type(t).__name__, "keys": list(getattr(t, "keys", ()))}
        if type(t).__name__ == "Orientationd":
            d["axcodes"] = t.ornt_transform.axcodes
        if type(t).__name__ == "Spacingd":
            d["pixdim"] = [float(x) for x in t.spacing_transform.pixdim]
            d["mode"] = list(t.mode)
        if type(t).__name__ == "Intensityd":  # the intensity key; zscore is MONAI's NormalizeIntensityd
            d["intensity"] = t.spec
            n = t.transform.normalizer
            d.update(subtrahend=n.subtrahend, divisor=n.divisor, nonzero=n.nonzero, channel_wise=n.channel_wise)
        out.append(d)
    return out


@pytest.mark.parametrize("bundle", ALL)
def test_one_preprocessing_in_train_evaluate_inference(bundle):
    """train (before the random part), validation, evaluate and inference resolve the same transform list, and a
    ``spacing`` override reaches all of them."""
    train = _parser(bundle, "train")
    infer = _parser(bundle, "inference")
    lists = {
        "train": train.get_parsed_content("train#deterministic_transforms"),
        "inference": infer.get_parsed_content("preprocessing").transforms,
    }
    if bundle in SEGMENTATION:
        lists["validate"] = train.get_parsed_content("validate#preprocessing").transforms
        lists["evaluate"] = _parser(bundle, "train", "evaluate").get_parsed_content("validate#preprocessing").transforms

    class C:  # a Compose-like holder for _describe
        def __init__(self, transforms):
            self.transforms = transforms

    described = {k: _describe(C(v)) for k, v in lists.items()}
    first = described["train"]
    assert [d["class"] for d in first] == [
        "LoadVolumed",
        "CheckVolumed",  # the file's own voxels (NaN, label values), before anything changes them
        "Orientationd",
        "Spacingd",
        "Intensityd",
        "EnsureTyped",
    ]
    assert first[2]["axcodes"] == "RAS" and first[3]["pixdim"] == [0.625] * 3
    assert first[4] == {**first[4], "subtrahend": None, "divisor": None, "nonzero": False, "channel_wise": False,
                        "intensity": {"mode": "zscore"}}  # fmt: skip
    for name, d in described.items():
        assert d == first, f"{bundle}: {name} preprocessing differs from train's"
    # the raw config text too: one definition, no drift
    assert train.get("train#deterministic_transforms") == infer.get("preprocessing#transforms")
    coarse = _parser(bundle, "inference", spacing=[1.25, 1.25, 1.25]).get_parsed_content("preprocessing")
    assert _describe(coarse)[3]["pixdim"] == [1.25] * 3


def _clinic_case(src_img, src_lab):
    """A real LA case permuted, flipped, in scanner units (int16) and at another spacing, as a clinic sends it."""
    img, lab = nib.load(str(src_img)), nib.load(str(src_lab))
    data = np.asarray(img.dataobj, dtype=np.float32)
    data = np.round(np.transpose(data, (2, 0, 1))[:, ::-1] * 180 + 600).astype(np.int16)
    label = np.transpose(np.asarray(lab.dataobj), (2, 0, 1))[:, ::-1].astype(np.uint8)
    affine = img.affine[:, [2, 0, 1, 3]].copy()
    affine[:3, 3] += affine[:3, 1] * (data.shape[1] - 1)
    affine[:3, 1] *= -1
    affine[:3, :3] *= 1.6  # 1.0 mm voxels (the same array over a larger field of view)
    return data, label, affine


def test_invertd_undoes_the_preprocessing_on_a_real_label(la_dir, tmp_path):
    """A real label, permuted / flipped / in other units: preprocessing (to RAS at 0.625 mm) then ``Invertd``
    gives back the input exactly (nearest neighbour), in the input's shape and affine; and the preprocessed shape is
    what the header check predicts (so the patch-size check before training is right)."""
    case = sorted((la_dir / "imagesTr").glob("*.nii.gz"))[0]
    data, label, affine = _clinic_case(case, la_dir / "labelsTr" / case.name)
    write_nifti(data, affine, tmp_path / "img.nii.gz")
    write_nifti(label, affine, tmp_path / "lab.nii.gz")
    for spacing in ([1.0, 1.0, 1.0], [0.5, 0.5, 0.5]):  # the input's own grid, and a finer one
        parser = _parser("la_seg_finetune", "train", spacing=spacing)
        pre = parser.get_parsed_content("validate#preprocessing")
        from monai.transforms import Invertd

        out = pre({"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")})
        assert tuple(out["image"].shape[1:]) == resampled_shape(label.shape, affine, spacing)
        assert abs(float(out["image"].mean())) < 1e-3 and abs(float(out["image"].std()) - 1) < 1e-2  # z-scored
        back = Invertd("label", transform=pre, orig_keys="image", nearest_interp=True)(out)["label"]
        assert tuple(back.shape[1:]) == label.shape
        np.testing.assert_allclose(back.affine.numpy(), affine, atol=1e-4)
        np.testing.assert_array_equal(back[0].numpy().round().astype(np.uint8), label)


@pytest.mark.parametrize(
    "affine_fix, message",
    [
        (lambda a: a @ np.diag([1, 1, 0, 1]), "affine is singular"),
        (lambda a: np.diag([0.625, 0.625, 1e4, 1]), "voxel spacing [0.625, 0.625, 10000.0] mm is outside"),
        (lambda a: np.diag([0.625, 0.625, 0.0001, 1]), "voxel spacing [0.625, 0.625, 0.0001] mm is outside"),
    ],
)
def test_bad_geometry_is_refused_with_the_file_named(affine_fix, message, tmp_path):
    path = tmp_path / "bad.nii.gz"
    img = nib.Nifti1Image(np.zeros((40, 40, 32), np.float32), None)  # sform written by hand: nibabel refuses a
    affine = affine_fix(np.diag([0.625, 0.625, 0.625, 1.0]))  # singular qform, scanners' exports do not
    for i, row in enumerate(("srow_x", "srow_y", "srow_z")):
        img.header[row] = affine[i]
    img.header["sform_code"], img.header["qform_code"] = 1, 0
    nib.save(img, str(path))
    with pytest.raises(DataError, match=str(path).replace(".", r"\.")) as err:
        check_headers(path)
    assert message in str(err.value)
    # through a bundle's inference, as a user meets it: the last line names the file and the problem
    proc = bundle_cmd(
        "run",
        "--config_file",
        configs("la_seg_finetune", "inference"),
        "--bundle_root",
        tmp_path,
        "--dataset_dir",
        path,
        check=False,
    )
    assert proc.returncode != 0 and message in proc.stdout.strip().splitlines()[-1] and str(path) in proc.stdout


def test_patch_check_uses_the_resampled_shape(tmp_path):
    """A volume that is large enough in voxels but too small once resampled to ``spacing`` is refused up front."""
    path = tmp_path / "small.nii.gz"
    write_nifti(np.zeros((64, 64, 40), np.float32), np.diag([0.625, 0.625, 0.625, 1.0]), path)
    assert check_headers(path, min_shape=[32, 32, 20], spacing=[1.25, 1.25, 1.25]) == (32, 32, 20)
    assert check_headers(path, min_shape=[64, 64, 40]) == (64, 64, 40)  # without spacing: the stored grid
    with pytest.raises(DataError, match=r"\(32, 32, 20\) on the \[1.25, 1.25, 1.25\] mm grid is smaller"):
        check_headers(path, min_shape=[32, 32, 24], spacing=[1.25, 1.25, 1.25])


@pytest.fixture(scope="module")
def la_weights(la_dir, module_tmp):
    """The released la_seg_finetune weights (the committed release, pulled offline and checksum-verified): weights
    that segment the atrium, at the bundles' own 0.625 mm grid and patch (a 150-iteration training on 3 cases took
    9 minutes here). Returns three real cases and the weights."""
    from medssl.bundle import default_index
    from medssl.clinic.release import pull

    cases = [p.name.replace(".nii.gz", "") for p in sorted((la_dir / "imagesTr").glob("*.nii.gz"))[:3]]
    bundle = pull("la_seg_finetune", bundle_dir=str(module_tmp("geometry")), index=default_index(), torchscript=False)
    return cases, Path(bundle) / "models" / "model.pt"


def test_clinic_variants_segment_alike_in_every_bundle(la_weights, la_dir, tmp_path):
    """One real LA case written as every variant of medssl.geometry (scanner units, flipped, permuted, 1.0 mm,
    0.625 x 0.625 x 1.25 mm) goes through each segmentation bundle's inference: each label map has its input's
    shape and affine and its Dice with the equally transformed label is within 2 points of the canonical input's."""
    cases, weights = la_weights
    case = cases[0]
    scans = tmp_path / "scans"
    labels = {}
    for variant in VARIANTS:
        img, lab = write_variant(
            la_dir / "imagesTr" / f"{case}.nii.gz", la_dir / "labelsTr" / f"{case}.nii.gz", tmp_path / variant, variant
        )
        (scans / f"{variant}.nii.gz").parent.mkdir(exist_ok=True)
        (scans / f"{variant}.nii.gz").symlink_to(img)
        labels[variant] = lab
    for bundle in SEGMENTATION:
        root = tmp_path / bundle
        (root / "models").mkdir(parents=True)
        (root / "models" / "model.pt").symlink_to(weights)
        bundle_cmd(
            "run",
            "--config_file",
            configs(bundle, "inference"),
            "--bundle_root",
            root,
            "--dataset_dir",
            scans,
        )
        dice = {}
        for variant, lab_path in labels.items():
            src, pred = nib.load(str(scans / f"{variant}.nii.gz")), nib.load(
                str(root / "eval" / f"{variant}_seg.nii.gz")
            )
            assert pred.shape == src.shape and pred.get_data_dtype() == np.uint8, (bundle, variant)
            np.testing.assert_allclose(pred.affine, src.affine, atol=1e-4)
            p = np.asarray(pred.dataobj)
            assert ndimage.label(p, np.ones((3, 3, 3)))[1] == 1  # the largest (26-connected) component only
            dice[variant] = case_metrics(p, np.asarray(nib.load(str(lab_path)).dataobj))["dice"]
        assert dice["release"] > 0.75, dice  # the weights segment the atrium at all
        for variant, d in dice.items():
            assert abs(d - dice["release"]) <= 0.02, (bundle, variant, dice)
