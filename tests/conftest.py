"""Shared test fixtures.

Real data is read from the team folder beside the checkout (``../shared``); set ``MEDSSL_SHARED_DIR``
to point elsewhere. Tests that need it skip with the reason when it is truly absent.
"""

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("MEDSSL_SHARED_DIR", REPO.parent / "shared")).resolve()
LA_DIR = SHARED_DIR / "data" / "la"
LA_H5_DIR = SHARED_DIR / "data" / "la_h5_samples"
SCHEMA = SHARED_DIR / "schema" / "meta_schema_20240725.json"

# segment, the DICOM node and the MONAI Label app run ``--runtime auto`` by default: on a machine with OpenVINO it
# times the runtimes once and may pick int8. The suite pins PyTorch (tests compare label maps with PyTorch's, and a
# probe in every fresh MEDSSL_HOME would cost ~30 s); tests/test_runtime_choice.py runs ``auto`` itself.
os.environ.setdefault("MEDSSL_RUNTIME", "torch")


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found: the real data (LA, ACDC) and schema live in ../shared (or MEDSSL_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def la_dir() -> Path:
    return _need(LA_DIR / "dataset.json").parent


@pytest.fixture(scope="session")
def acdc_dir() -> Path:
    """ACDC as SSL4MIS splits it (../shared/data/acdc: 70 training patients, 10 validation patients)."""
    return _need(SHARED_DIR / "data" / "acdc" / "dataset.json").parent


@pytest.fixture(scope="session")
def la_h5_dir() -> Path:
    return _need(LA_H5_DIR)


@pytest.fixture(scope="session")
def schema_path() -> Path:
    return _need(SCHEMA)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    """``module_tmp(name)``: a fresh folder for a module's shared fixtures, deleted when the module's tests end
    (pytest keeps ``tmp_path_factory`` folders to the end of the session; trained bundles are hundreds of MB)."""
    made = []

    def mk(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mk
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def orthanc_server(module_tmp):
    """A throw-away Orthanc PACS on 127.0.0.1 for the module (see tests/orthanc.py: free ports, AET ORTHANC, no
    authentication, DICOMweb plugin); stopped after the module. Skips only when the Orthanc binary is absent."""
    from orthanc import Orthanc, find_orthanc

    if not find_orthanc():
        pytest.skip("Orthanc not installed (apt-get install orthanc orthanc-dicomweb); CI installs it")
    with Orthanc(module_tmp("orthanc")) as server:
        yield server
