"""Loss math on hand-computed tiny cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from medssl.losses import (
    CVRLLoss,
    ElasticInteractionLoss,
    VoxelToVolumeContrastLoss,
    VoxelToVoxelContrastLoss,
    sigmoid_rampup,
    softmax_mse,
)
from medssl.networks import HeadsForward, VNet, ema_copy


def test_sigmoid_rampup():
    assert sigmoid_rampup(0, 6000) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(3000, 6000) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(6000, 6000) == 1.0 and sigmoid_rampup(9000, 6000) == 1.0
    assert sigmoid_rampup(-5, 10) == pytest.approx(math.exp(-5)) and sigmoid_rampup(3, 0) == 1.0


def test_softmax_mse_hand_computed():
    s = torch.tensor([0.0, 0.0]).reshape(1, 2, 1, 1, 1)  # softmax (0.5, 0.5)
    t = torch.tensor([math.log(3.0), 0.0]).reshape(1, 2, 1, 1, 1)  # softmax (0.75, 0.25)
    assert float(softmax_mse(s, t)) == pytest.approx(0.0625)  # mean of 0.25^2 and 0.25^2
    with pytest.raises(ValueError, match=r"shapes differ: \[1, 2, 1, 1, 1\] vs \[1, 2, 1, 1, 2\]"):
        softmax_mse(s, torch.zeros(1, 2, 1, 1, 2))


def _one_hot_embeddings(b, d, n):
    """[B, D, n, 1, 1] embeddings where voxel i is the unit vector e_i."""
    e = torch.eye(d)[:n].T.reshape(1, d, n, 1, 1)
    return e.repeat(b, 1, 1, 1, 1)


def test_voxel_to_voxel_contrast_hand_computed():
    loss = VoxelToVoxelContrastLoss(temperature=0.1)
    q = k = _one_hot_embeddings(2, 4, 4)
    index = torch.arange(4).repeat(2, 1)
    # positives have similarity 1, negatives 0: -log(e^10 / (e^10 + 3))
    assert float(loss(q, k, index)) == pytest.approx(math.log(1 + 3 * math.exp(-10)), abs=1e-6)  # float32
    # an arbitrary case against the formula written out voxel by voxel
    torch.manual_seed(0)
    q, k = torch.randn(1, 3, 5, 1, 1), torch.randn(1, 3, 5, 1, 1)
    qn, kn = F.normalize(q[0, :, :, 0, 0].T, dim=1), F.normalize(k[0, :, :, 0, 0].T, dim=1)
    expected = -sum(torch.log_softmax(qn[i] @ kn.T / 0.1, 0)[i] for i in range(5)) / 5
    assert float(loss(q, k, torch.arange(5)[None])) == pytest.approx(float(expected), rel=1e-5)
    # gradients reach the query only
    q.requires_grad_(True), k.requires_grad_(True)
    loss(q, k, torch.arange(5)[None]).backward()
    assert q.grad.abs().sum() > 0 and k.grad is None
    with pytest.raises(ValueError, match="query and key must be"):
        loss(torch.zeros(1, 3, 5), torch.zeros(1, 3, 4))


def test_voxel_to_volume_contrast_hand_computed():
    loss = VoxelToVolumeContrastLoss(dim=2, temperature=0.1, queue_size=1)
    loss.queue.copy_(torch.tensor([[-1.0, 0.0]]))
    key = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(2, 2, 1, 1, 1).repeat(1, 1, 2, 1, 1)  # g0 = e1, g1 = e2
    query = key.clone()
    index = torch.tensor([[0, 1], [0, 1]])
    # each anchor: positive 1, the other volume 0, the queue entry -1 (volume 1's anchors: queue similarity 0)
    v0 = -math.log(math.exp(10) / (math.exp(10) + 1 + math.exp(-10)))
    v1 = -math.log(math.exp(10) / (math.exp(10) + 1 + 1))
    assert float(loss(query, key, index)) == pytest.approx((v0 + v1) / 2, abs=1e-6)  # float32
    # the batch's pooled embeddings entered the queue (size 1: the last one stays), pointer wrapped
    torch.testing.assert_close(loss.queue, torch.tensor([[0.0, 1.0]]))
    assert int(loss.queue_ptr) == 0
    assert {"queue", "queue_ptr"} <= set(loss.state_dict())  # saved with the resume checkpoint


def test_elastic_interaction_single_mode():
    """d = a cos(2 pi m x / L): the energy is |k0| a^2 / 2 with k0 = 2 pi m / L."""
    L, m, a = 16, 3, 0.5
    x = torch.arange(L, dtype=torch.float64)
    d = (a * torch.cos(2 * math.pi * m * x / L)).reshape(1, 1, L, 1, 1)
    e = ElasticInteractionLoss()(d, torch.zeros_like(d))
    assert float(e) == pytest.approx(2 * math.pi * m / L * a**2 / 2, rel=1e-6)
    # constant errors (k = 0) cost nothing; a perfect prediction costs nothing
    assert float(ElasticInteractionLoss()(torch.ones(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4))) == 0.0
    # a finer wrong structure costs more than a coarse one of the same L2 error (the geometric part)
    coarse = (a * torch.cos(2 * math.pi * 1 * x / L)).reshape(1, 1, L, 1, 1)
    assert float(ElasticInteractionLoss()(coarse, torch.zeros_like(coarse))) < float(e)


def test_cvrl_objective_terms_and_gradients():
    torch.manual_seed(0)
    student = VNet(proj_dim=8)
    teacher = ema_copy(student)
    objective = CVRLLoss(dim=8, num_voxels=16, queue_size=8, rampup_iterations=100)
    image_l, image_u = torch.randn(2, 1, 16, 16, 16), torch.randn(2, 1, 16, 16, 16)
    label_l = (torch.rand(2, 1, 16, 16, 16) > 0.7).float()
    out = objective(HeadsForward(student), teacher.forward_heads, image_l, label_l, image_u, iteration=0)
    assert set(out) == {
        "loss",
        "pred",
        "loss_sup",
        "loss_contour",
        "loss_consistency",
        "loss_global",
        "loss_local",
        "weight_rampup",
    }
    assert out["pred"].shape == (2, 2, 16, 16, 16)
    w = math.exp(-5)
    expected = (
        out["loss_sup"]
        + 0.1 * out["loss_contour"]
        + w * 0.1 * (out["loss_consistency"] + out["loss_global"] + out["loss_local"])
    )
    assert float(out["loss"].detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    out["loss"].backward()
    assert all(p.grad is not None for p in student.proj_head.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="needs a teacher"):
        objective(HeadsForward(student), None, image_l, label_l, image_u, iteration=0)


def test_pairwise_similarity_distillation_hand_computed():
    from medssl.losses import PairwiseSimilarityDistillationLoss

    loss = PairwiseSimilarityDistillationLoss(temperature=0.5)
    student = _one_hot_embeddings(1, 2, 2)  # voxel 0 = e1, voxel 1 = e2: similarities [[1, 0], [0, 1]]
    teacher = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).reshape(1, 2, 2, 1, 1)  # both voxels e1: all similarities 1
    index = torch.tensor([[0, 1]])
    p_s = torch.tensor([math.exp(2), 1.0]) / (math.exp(2) + 1)  # a student row: softmax of (1/0.5, 0)
    kl_row = float((0.5 * (torch.log(torch.tensor(0.5)) - torch.log(p_s))).sum())  # teacher row is (0.5, 0.5)
    assert float(loss(student, teacher, index)) == pytest.approx(kl_row, rel=1e-5)
    assert float(loss(teacher, teacher, index)) == pytest.approx(0.0, abs=1e-7)  # same structure: nothing to learn


def test_boundary_aware_contrast():
    from medssl.losses import BoundaryAwareContrastLoss

    loss = BoundaryAwareContrastLoss(temperature=0.1, num_voxels=4)
    e = _one_hot_embeddings(1, 4, 4)
    # with one-hot views the symmetric InfoNCE equals the one-directional value
    assert float(loss(e, e, index=torch.arange(4)[None])) == pytest.approx(math.log(1 + 3 * math.exp(-10)), abs=1e-6)
    # sampling follows the boundary: an SDM whose boundary band is 10 voxels of 1000
    torch.manual_seed(0)
    sdm = torch.ones(1, 1, 1000, 1, 1)
    sdm[0, 0, :10] = 0.0
    picked = []

    def spy(view1, view2, num, index):
        picked.append(index)
        return (
            view1.flatten(2).transpose(1, 2)[:, : index.shape[1]],
            view2.flatten(2).transpose(1, 2)[:, : index.shape[1]],
        )

    import medssl.losses as losses

    real = losses._sample_voxels
    losses._sample_voxels = lambda q, k, n, index: (spy(q, k, n, index), real(q, k, n, index))[1]
    try:
        BoundaryAwareContrastLoss(num_voxels=8, band=0.05)(
            torch.randn(1, 3, 1000, 1, 1), torch.randn(1, 3, 1000, 1, 1), sdm=sdm
        )
    finally:
        losses._sample_voxels = real
    assert (picked[0] < 10).float().mean() >= 0.99  # exp(-1/0.05) makes a far voxel ~5e8 times less likely
    with pytest.raises(ValueError, match="give the signed distance map"):
        loss(e, e)


def test_simcvd_objective_terms_and_gradients():
    from medssl.losses import SimCVDLoss
    from medssl.transforms import signed_distance_map

    torch.manual_seed(0)
    student = VNet(sdm_head=True, proj_dim=8)
    teacher = ema_copy(student)
    objective = SimCVDLoss(dim=8, num_voxels=16, rampup_iterations=100)
    image_l, image_u = torch.randn(2, 1, 16, 16, 16), torch.randn(2, 1, 16, 16, 16)
    label_l = (torch.rand(2, 1, 16, 16, 16) > 0.7).float()
    sdm = torch.stack([torch.as_tensor(signed_distance_map(lab[0].numpy()))[None] for lab in label_l])
    out = objective(HeadsForward(student), teacher.forward_heads, image_l, label_l, image_u, iteration=50, sdm=sdm)
    assert set(out) == {
        "loss",
        "pred",
        "loss_seg",
        "loss_sdm",
        "loss_contrast",
        "loss_distill",
        "loss_consistency",
        "weight_rampup",
    }
    w = math.exp(-5 * 0.25)
    expected = (
        out["loss_seg"]
        + 0.3 * out["loss_sdm"]
        + w * 0.1 * (out["loss_contrast"] + out["loss_distill"] + out["loss_consistency"])
    )
    assert float(out["loss"].detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    out["loss"].backward()
    assert all(p.grad is not None for p in student.sdm_conv.parameters())
    assert all(p.grad is not None for p in student.proj_head.parameters())
    with pytest.raises(ValueError, match="needs the labeled batch's 'sdm'"):
        objective(HeadsForward(student), teacher.forward_heads, image_l, label_l, image_u, iteration=0)
    with pytest.raises(ValueError, match="sdm_head=True and proj_dim > 0"):
        plain = VNet()
        objective(HeadsForward(plain), ema_copy(plain).forward_heads, image_l, label_l, image_u, 0, sdm=sdm)
