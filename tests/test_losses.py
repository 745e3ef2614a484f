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


def _cvrl_case():
    """A seeded binary CVRL case: student, teacher, objective, labeled images and labels, unlabeled images."""
    torch.manual_seed(0)
    student = VNet(proj_dim=8)
    teacher = ema_copy(student)
    objective = CVRLLoss(dim=8, num_voxels=16, queue_size=8, rampup_iterations=100)  # draws its queue: before the data
    image_l, image_u = torch.randn(2, 1, 16, 16, 16), torch.randn(2, 1, 16, 16, 16)
    label_l = (torch.rand(2, 1, 16, 16, 16) > 0.7).float()
    return student, teacher, objective, image_l, label_l, image_u


def _simcvd_case():
    """A seeded binary SimCVD case: as :func:`_cvrl_case`, with the labels' signed distance maps."""
    from medssl.losses import SimCVDLoss
    from medssl.transforms import signed_distance_map

    torch.manual_seed(0)
    student = VNet(sdm_head=True, proj_dim=8)
    teacher = ema_copy(student)
    objective = SimCVDLoss(dim=8, num_voxels=16, rampup_iterations=100)
    image_l, image_u = torch.randn(2, 1, 16, 16, 16), torch.randn(2, 1, 16, 16, 16)
    label_l = (torch.rand(2, 1, 16, 16, 16) > 0.7).float()
    sdm = torch.stack([torch.as_tensor(signed_distance_map(lab[0].numpy()))[None] for lab in label_l])
    return student, teacher, objective, image_l, label_l, image_u, sdm


def test_cvrl_objective_terms_and_gradients():
    student, teacher, objective, image_l, label_l, image_u = _cvrl_case()
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

    import medssl.losses.simcvd as simcvd  # where BoundaryAwareContrastLoss looks _sample_voxels up

    real = simcvd._sample_voxels
    simcvd._sample_voxels = lambda q, k, n, index: (spy(q, k, n, index), real(q, k, n, index))[1]
    try:
        BoundaryAwareContrastLoss(num_voxels=8, band=0.05)(
            torch.randn(1, 3, 1000, 1, 1), torch.randn(1, 3, 1000, 1, 1), sdm=sdm
        )
    finally:
        simcvd._sample_voxels = real
    assert (picked[0] < 10).float().mean() >= 0.99  # exp(-1/0.05) makes a far voxel ~5e8 times less likely
    with pytest.raises(ValueError, match="give the signed distance map"):
        loss(e, e)


def test_simcvd_objective_terms_and_gradients():
    student, teacher, objective, image_l, label_l, image_u, sdm = _simcvd_case()
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


def test_queue_infonce_hand_computed_and_queue():
    from medssl.losses import QueueInfoNCELoss

    loss = QueueInfoNCELoss(dim=2, queue_size=2, temperature=0.5)
    loss.queue.copy_(torch.tensor([[0.0, 1.0], [-1.0, 0.0]]))
    q = torch.tensor([[3.0, 0.0]])  # normalised inside: e1
    k = torch.tensor([[1.0, 0.0]])
    # logits (1, 0, -1) / 0.5
    expected = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))
    assert float(loss(q, k)) == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(loss.queue, torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))  # the key replaced slot 0
    assert int(loss.queue_ptr) == 1
    loss.eval()
    loss(q, k)
    assert int(loss.queue_ptr) == 1  # evaluation does not enqueue
    with pytest.raises(ValueError, match=r"must be \[B, 2\]"):
        loss(torch.zeros(1, 3), torch.zeros(1, 3))


def test_split_bn_encode_keeps_order_and_splits_statistics():
    from medssl.losses import _split_bn_encode

    torch.manual_seed(0)
    net = VNet(dropout=0).train()
    x = torch.randn(4, 1, 16, 16, 16)
    feats = _split_bn_encode(net, x, splits=2, generator=torch.Generator().manual_seed(3))
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(3))
    first, second = net.encode(x[perm[:2]]), net.encode(x[perm[2:]])
    for level, f in enumerate(feats):
        expected = torch.empty_like(f)
        expected[perm[:2]], expected[perm[2:]] = first[level], second[level]
        torch.testing.assert_close(f, expected)  # each half normalised with its own statistics, original order
    whole = net.encode(x)
    assert not torch.allclose(feats[0], whole[0])  # ... which differ from the whole batch's (the query's)


def test_pcrl_objective_targets():
    """With hybrid and mixup weights pinned, every reconstruction term equals the MSE to its documented target."""
    from medssl.losses import PCRLLoss
    from medssl.networks import PCRLForward, PCRLNet

    torch.manual_seed(0)
    net = PCRLNet()
    teacher = ema_copy(net)
    shape = (2, 1, 16, 16, 16)
    batch = {k: torch.randn(shape) for k in ["view1", "view2", "gt1", "gt2", "target1", "target2"]}
    code = torch.zeros(2, 7)
    code[:, 3] = 1
    batch["target1_code"] = batch["target2_code"] = code
    objective = PCRLLoss(dim=128, queue_size=8, bn_splits=1)
    captured = {}

    def student(*args):
        out = PCRLForward(net)(*args)
        captured.update(out, alpha1=args[6], alpha2=args[7], mixed_view1=args[1])
        return out

    out = objective(student, teacher, batch, iteration=1)
    a1, a2 = captured["alpha1"], captured["alpha2"]
    assert 0.5 <= a1 <= 1 and 0.5 <= a2 <= 1
    mse = torch.nn.functional.mse_loss
    assert float(out["loss_recon"]) == pytest.approx(float(mse(captured["recon"], batch["target1"])), rel=1e-5)
    hybrid_target = a1 * batch["target1"] + (1 - a1) * batch["target2"]
    assert float(out["loss_recon_hybrid"]) == pytest.approx(
        float(mse(captured["recon_hybrid"], hybrid_target)), rel=1e-5
    )
    # the mixed view 1 is lam * view1 + (1 - lam) * view1[perm] for some lam >= 0.5 and permutation of 2
    mv = captured["mixed_view1"]
    v = batch["view1"]
    lam_candidates = [(mv - v[[1, 0]]).flatten() @ (v - v[[1, 0]]).flatten() / ((v - v[[1, 0]]) ** 2).sum()]
    lam = float(lam_candidates[0])
    if 0.5 <= lam <= 1 and torch.allclose(mv, lam * v + (1 - lam) * v[[1, 0]], atol=1e-5):
        mixed_gt1 = lam * batch["gt1"] + (1 - lam) * batch["gt1"][[1, 0]]
    else:  # the identity permutation: no mixing
        mixed_gt1 = batch["gt1"]
    assert float(out["loss_recon_mixed"]) == pytest.approx(float(mse(captured["recon_mixed"], mixed_gt1)), rel=1e-4)
    total = (
        out["loss_contrast"]
        + (out["loss_recon"] + out["loss_recon_mixed"] + out["loss_recon_hybrid"] + out["loss_recon_mixed_hybrid"]) / 4
    )
    assert float(out["loss"]) == pytest.approx(float(total), rel=1e-6)
    assert int(objective.contrast.queue_ptr) == (3 * 2) % 8  # three contrasts enqueue their keys (official)


# -- several classes ------------------------------------------------------------------------------------------------


def test_foreground_one_hot():
    from medssl.losses import foreground_one_hot

    label = torch.tensor([0, 1, 2, 3, 1.0]).reshape(1, 1, 5, 1, 1)
    hot = foreground_one_hot(label, 4)
    assert hot.shape == (1, 3, 5, 1, 1) and hot.dtype == torch.float32
    assert hot[0, :, :, 0, 0].tolist() == [[0, 1, 0, 0, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0]]
    binary = (torch.rand(2, 1, 4, 4, 4) > 0.5).float()
    assert torch.equal(foreground_one_hot(binary, 2), (binary == 1).float())  # two classes: label == 1, as before
    with pytest.raises(ValueError, match=r"label values \[0, 1, 2, 3\] are outside the 3 classes 0..2"):
        foreground_one_hot(label, 3)
    with pytest.raises(ValueError, match=r"class-id label \[B, 1, \*spatial\]"):
        foreground_one_hot(torch.zeros(1, 2, 4, 4, 4), 3)


def test_elastic_energy_of_several_classes_is_the_mean_over_classes():
    """d = p - y alternating +a, -a along one axis of two voxels: the only mode is k = pi with |FFT|^2 = (2a)^2, so
    E = pi (2a)^2 / 2^2 = pi a^2 per channel; channels (classes) are averaged."""
    loss = ElasticInteractionLoss()
    p = torch.tensor([[0.5, 0.0], [0.25, 0.0], [0.0, 0.0]]).reshape(1, 3, 2, 1, 1)
    y = torch.tensor([[0.0, 0.5], [0.0, 0.25], [0.0, 0.0]]).reshape(1, 3, 2, 1, 1)  # d: a = 0.5, 0.25, 0
    assert float(loss(p, y)) == pytest.approx(math.pi * (0.5**2 + 0.25**2 + 0) / 3, rel=1e-6)


def test_cvrl_objective_four_classes():
    """Four classes (the CT set of the issue crashed here): the contour term is the elastic energy of each foreground
    class's probability against its one-hot label, averaged over the classes, computed here class by class."""
    torch.manual_seed(0)
    student = VNet(out_channels=4, proj_dim=8)
    teacher = ema_copy(student)
    objective = CVRLLoss(dim=8, num_voxels=16, queue_size=8, rampup_iterations=100)
    image_l, image_u = torch.randn(2, 1, 16, 16, 16), torch.randn(2, 1, 16, 16, 16)
    label_l = torch.randint(0, 4, (2, 1, 16, 16, 16)).float()
    out = objective(HeadsForward(student), teacher.forward_heads, image_l, label_l, image_u, iteration=0)
    prob = out["pred"].detach().float().softmax(1)
    per_class = [ElasticInteractionLoss()(prob[:, c : c + 1], (label_l == c).float()) for c in (1, 2, 3)]
    assert float(out["loss_contour"]) == pytest.approx(float(sum(per_class) / 3), rel=1e-5)
    assert out["pred"].shape == (2, 4, 16, 16, 16) and torch.isfinite(out["loss"])
    out["loss"].backward()
    with pytest.raises(ValueError, match=r"label values \[0, 1, 2, 4\] are outside the 4 classes"):
        bad = label_l + (label_l == 3).float()  # a 4 where there were 3s
        objective(HeadsForward(student), teacher.forward_heads, image_l, bad, image_u, 0)


def test_boundary_sampling_gives_each_class_its_share():
    from medssl.losses.simcvd import _per_class_index, _weighted_index

    torch.manual_seed(0)
    sdm = torch.ones(1, 3, 1000)
    sdm[0, 0, :10] = 0.0  # class 1's boundary band: voxels 0-9
    sdm[0, 1, 500:510] = 0.0  # class 2's: 500-509
    sdm[0, 2, 990:] = 0.0  # class 3's: 990-999
    weights = torch.exp(-sdm.abs() / 0.05)
    index = _per_class_index(weights, 7)[0]
    assert index.shape == (7,) and len(set(index.tolist())) == 7  # distinct anchors
    assert [int(((lo <= index) & (index < lo + 10)).sum()) for lo in (0, 500, 990)] == [3, 2, 2]  # 7 = 3 + 2 + 2
    # a band smaller than its share: the class takes what is left of it after the classes before it, then elsewhere
    assert len(set(_per_class_index(weights, 40)[0].tolist())) == 40
    # one class: exactly the draw of today
    torch.manual_seed(1)
    one = _per_class_index(weights[:, :1], 8)
    torch.manual_seed(1)
    assert torch.equal(one, _weighted_index(weights[:, 0], 8))


def test_simcvd_objective_four_classes():
    from medssl.losses import BoundaryAwareContrastLoss, SimCVDLoss
    from medssl.transforms import SignedDistanceMapd

    torch.manual_seed(0)
    student = VNet(out_channels=4, sdm_head=True, proj_dim=8)
    teacher = ema_copy(student)
    objective = SimCVDLoss(dim=8, num_voxels=16, rampup_iterations=100)
    image_l, image_u = torch.randn(2, 1, 16, 16, 16), torch.randn(2, 1, 16, 16, 16)
    label_l = torch.randint(0, 4, (2, 1, 16, 16, 16)).float()
    sdm = torch.stack([SignedDistanceMapd("label", num_classes=4)({"label": lab})["sdm"] for lab in label_l])
    assert sdm.shape == (2, 3, 16, 16, 16)
    out = objective(HeadsForward(student), teacher.forward_heads, image_l, label_l, image_u, iteration=50, sdm=sdm)
    assert torch.isfinite(out["loss"]) and out["pred"].shape == (2, 4, 16, 16, 16)
    out["loss"].backward()
    with pytest.raises(ValueError, match=r"'sdm' is \[2, 1, 16, 16, 16\], the SDM head gives \[2, 3, 16, 16, 16\]"):
        objective(HeadsForward(student), teacher.forward_heads, image_l, label_l, image_u, 50, sdm=sdm[:, :1])
    with pytest.raises(ValueError, match=r"sdm must be \[B, K, \*spatial\]"):
        BoundaryAwareContrastLoss()(torch.randn(1, 4, 8, 8, 8), torch.randn(1, 4, 8, 8, 8), sdm=torch.zeros(1, 8, 8, 8))


def test_binary_objectives_give_the_values_of_before():
    """LA unchanged: CVRL and SimCVD with two classes give the values they gave before the multi-class change (the
    seeded cases of the two objective tests above, recorded with the binary code on the 2-core AMD EPYC)."""
    student, teacher, objective, image_l, label_l, image_u = _cvrl_case()
    out = objective(HeadsForward(student), teacher.forward_heads, image_l, label_l, image_u, iteration=0)
    recorded = {"loss": 0.724089, "loss_sup": 0.651744, "loss_contour": 0.701637, "loss_consistency": 0.03318,
                "loss_global": 0.714349, "loss_local": 2.489337}  # fmt: skip
    assert {k: float(out[k]) for k in recorded} == pytest.approx(recorded, rel=2e-4)
    student, teacher, objective, image_l, label_l, image_u, sdm = _simcvd_case()
    out = objective(HeadsForward(student), teacher.forward_heads, image_l, label_l, image_u, iteration=50, sdm=sdm)
    recorded = {"loss": 0.95124, "loss_seg": 0.644401, "loss_sdm": 0.743561, "loss_contrast": 2.726048,
                "loss_distill": 0.145967, "loss_consistency": 0.051891}  # fmt: skip
    assert {k: float(out[k]) for k in recorded} == pytest.approx(recorded, rel=2e-4)
