"""Losses and objectives of the medssl methods, one module per method; every name is re-exported here, so
``medssl.losses.<name>`` (bundle configs, imports) keeps working.

Building blocks (each a small module or function with its math pinned by tests on tiny tensors):

- :func:`sigmoid_rampup`, :func:`softmax_mse`: the mean-teacher weight schedule and consistency of UA-MT
  (:mod:`medssl.losses.mean_teacher`).
- :class:`VoxelToVoxelContrastLoss`, :class:`VoxelToVolumeContrastLoss`: CVRL's local and global contrast
  (:mod:`medssl.losses.cvrl`).
- :class:`ElasticInteractionLoss`: the elastic-interaction active-contour energy CVRL uses as geometric regulariser
  (:mod:`medssl.losses.elastic`).
- :class:`BoundaryAwareContrastLoss`, :class:`PairwiseSimilarityDistillationLoss`: SimCVD's two unsupervised terms
  (:mod:`medssl.losses.simcvd`).
- :func:`supervised_loss`: the LA benchmark's Dice + cross-entropy, and :func:`foreground_one_hot`, a class-id label as
  one channel per foreground class (:mod:`medssl.losses.segmentation`).

Objectives (what :class:`medssl.engines.SemiSupervisedTrainer` calls each iteration):

- :class:`CVRLLoss`: CVRL (You et al., MICCAI 2022), in :mod:`medssl.losses.cvrl`.
- :class:`SimCVDLoss`: SimCVD (You et al., IEEE TMI 2022), with :class:`BoundaryAwareContrastLoss` and
  :class:`PairwiseSimilarityDistillationLoss`, in :mod:`medssl.losses.simcvd`.
- :class:`PCRLLoss`: PCRL pre-training (Zhou et al., ICCV 2021), with :class:`QueueInfoNCELoss`
  (for :class:`medssl.engines.SelfSupervisedTrainer`), in :mod:`medssl.losses.pcrl`.
- :class:`SparKLoss`: SparK masked image modelling (Tian et al., ICLR 2023), with :func:`spark_loss`, in
  :mod:`medssl.losses.spark` (the network, mask and sparse BatchNorm: :mod:`medssl.spark`).

The voxel sampling both voxel-wise contrasts (CVRL, SimCVD) share is in :mod:`medssl.losses.voxel_sampling`.
"""

from medssl.losses.cvrl import CVRLLoss, VoxelToVolumeContrastLoss, VoxelToVoxelContrastLoss
from medssl.losses.elastic import ElasticInteractionLoss
from medssl.losses.mean_teacher import sigmoid_rampup, softmax_mse
from medssl.losses.pcrl import PCRLLoss, QueueInfoNCELoss, _split_bn_encode  # noqa: F401 (tests import it here)
from medssl.losses.segmentation import foreground_one_hot, supervised_loss
from medssl.losses.simcvd import BoundaryAwareContrastLoss, PairwiseSimilarityDistillationLoss, SimCVDLoss
from medssl.losses.spark import SparKLoss, spark_loss

__all__ = [
    "sigmoid_rampup",
    "softmax_mse",
    "supervised_loss",
    "foreground_one_hot",
    "VoxelToVoxelContrastLoss",
    "VoxelToVolumeContrastLoss",
    "ElasticInteractionLoss",
    "CVRLLoss",
    "BoundaryAwareContrastLoss",
    "PairwiseSimilarityDistillationLoss",
    "SimCVDLoss",
    "QueueInfoNCELoss",
    "PCRLLoss",
    "spark_loss",
    "SparKLoss",
]
