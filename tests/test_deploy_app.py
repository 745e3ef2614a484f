"""The MONAI Deploy app (apps/deploy): a DICOM MR series in, a DICOM SEG out, through the SDK's operators, with the
pulled la_seg_finetune bundle; its label map must be the one ``python -m medssl segment`` writes for the same series.

The SDK (Holoscan) lives in its own environment, ``.venv-deploy`` (``bash apps/deploy/make_env.sh``, which reuses
``.venv`` for torch and medssl; ``MEDSSL_DEPLOY_PYTHON`` may point at another one's python).
"""

import os
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers import REPO

from medssl.clinic.dicom import nifti_to_series, read_seg, read_series
from medssl.metrics import dice

DEPLOY_PYTHON = os.environ.get("MEDSSL_DEPLOY_PYTHON", str(REPO / ".venv-deploy" / "bin" / "python"))
ROW = 2  # a training case of the release (not one of the dev cases 61-80): the Dice checks geometry


@pytest.mark.skipif(
    not os.path.isfile(DEPLOY_PYTHON),
    reason=f"no MONAI Deploy environment at {DEPLOY_PYTHON}: bash apps/deploy/make_env.sh",
)
def test_deploy_app_writes_the_seg_that_segment_writes(la_dir, tmp_path, monkeypatch):
    from medssl.clinic.segment import segment

    case = (la_dir / "train.list").read_text().split()[ROW]
    series = tmp_path / "study" / case
    nifti_to_series(la_dir / "imagesTr" / f"{case}.nii.gz", series)
    home = tmp_path / "medssl_home"  # one pull of the release for both
    monkeypatch.setenv("MEDSSL_HOME", str(home))
    (record,) = segment([series], out=tmp_path / "segment", output_type="dicom_seg", progress=False, fail_fast=True)

    out = tmp_path / "deploy"
    proc = subprocess.run(
        [DEPLOY_PYTHON, str(REPO / "apps" / "deploy" / "app.py"), "-i", str(series), "-o", str(out), "-w",
         str(tmp_path / "work")],
        cwd=tmp_path, env={**os.environ, "MEDSSL_HOME": str(home)}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    seg_files = sorted(out.glob("*.dcm"))
    assert proc.returncode == 0 and len(seg_files) == 1, (proc.stdout + proc.stderr)[-6000:]

    volume = read_series(series)
    ds = pydicom.dcmread(seg_files[0])
    assert ds.Modality == "SEG" and ds.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.series_uid
    assert ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "82471001"  # left atrium
    deployed = read_seg(seg_files[0], volume)
    np.testing.assert_array_equal(deployed, read_seg(record["dicom_seg"], volume))  # identical masks
    truth = np.asanyarray(nib.load(la_dir / "labelsTr" / f"{case}.nii.gz").dataobj) > 0
    assert dice(deployed > 0, truth) > 0.85
