"""medssl: MONAI Bundles for label-efficient 3D medical image segmentation.

Bundle configs reach the package as ``medssl.<module>.<name>`` after ``"$import medssl"``.
"""

__version__ = "0.1.0"

# bundle configs use these
from medssl import bundle, data, handlers, metrics, networks, precision, runtime, transforms  # noqa: E402,F401
