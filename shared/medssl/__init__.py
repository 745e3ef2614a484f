"""medssl: MONAI Bundles for label-efficient 3D medical image segmentation.

Bundle configs reach the package as ``medssl.<module>.<name>`` after ``"$import medssl"``.

Layout: ``medssl.<module>`` is the library (what bundle configs name: networks, losses, transforms, engines, handlers,
data, metrics, export, ...); ``medssl.clinic`` holds what a hospital runs on top of it (segment, DICOM, the node,
releases), ``medssl.lab`` what a researcher runs (benchmark, speed, demo, sample data). The library imports no wing,
the clinic never imports the lab, and only ``medssl.cli`` imports everything (``tests/test_layout.py``).
"""

import warnings

__version__ = "0.2.0"

# With pydicom installed, MONAI's LoadImage builds its GPU DICOM reader on every call and warns that nvImageCodec (a
# CUDA package) is absent; the bundles read NIfTI and medssl.clinic.dicom reads DICOM, so the warning only adds noise.
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin", category=UserWarning)

# bundle configs use these
from medssl import bundle, data, export, handlers, metrics, networks, precision, runtime  # noqa: E402,F401
from medssl import task, transforms  # noqa: E402,F401
