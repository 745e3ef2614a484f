"""medssl: MONAI Bundles for label-efficient 3D medical image segmentation."""

__version__ = "0.1.0"
