"""SparK's pieces on hand-checked cases: the mask, sparse BatchNorm, no leak from hidden voxels, the per-cell
normalised loss that ignores visible cells, and the inference reconstruction."""

import numpy as np
import pytest
import torch
from torch import nn

from medssl.networks import VNet
from medssl.losses import SparKLoss, spark_loss
from medssl.spark import SparKNet, cell_stats, draw_mask, sparse_batch_norm, upsample_mask


def test_mask_hides_the_ratio_of_coarse_cells_and_repeats_to_every_scale():
    # 112x112x80 -> the 7x7x5 grid of METHODS.md: 245 cells, round(0.6 * 245) = 147 hidden, 98 visible
    visible = draw_mask(3, [7, 7, 5], 0.6, generator=torch.Generator().manual_seed(0))
    assert visible.shape == (3, 1, 7, 7, 5) and visible.dtype == torch.bool
    assert visible.sum(dim=(1, 2, 3, 4)).tolist() == [98, 98, 98]
    assert not torch.equal(visible[0], visible[1])  # each sample its own mask
    up = upsample_mask(visible, 16)
    assert up.shape == (3, 1, 112, 112, 80)
    assert torch.equal(up[:, :, ::16, ::16, ::16], visible) and torch.equal(up[:, :, 15::16, 15::16, 15::16], visible)
    assert up.float().mean().item() == pytest.approx(98 / 245)
    with pytest.raises(ValueError, match="mask_ratio"):
        draw_mask(1, [2, 2, 2], 1.0)


def test_sparse_batch_norm_is_batch_norm_over_the_visible_voxels():
    torch.manual_seed(0)
    bn = nn.BatchNorm3d(3, momentum=0.1)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    x = torch.randn(2, 3, 4, 4, 2) * 3 + 5
    visible = torch.rand(2, 1, 4, 4, 2) > 0.5
    out = sparse_batch_norm(bn, x, visible)
    # reference in numpy: per channel, the visible voxels of the whole batch
    xn, vn = x.numpy(), visible.numpy()[:, 0]
    for c in range(3):
        vals = xn[:, c][vn]
        mean, var = vals.mean(), vals.var()  # biased, as BatchNorm normalises with
        expect = (xn[:, c] - mean) / np.sqrt(var + 1e-5) * bn.weight[c].item() + bn.bias[c].item()
        np.testing.assert_allclose(out[:, c].detach().numpy()[vn], expect[vn], rtol=1e-4, atol=1e-5)
        assert np.all(out[:, c].detach().numpy()[~vn] == 0)  # hidden voxels stay empty
        # running statistics moved towards the visible voxels' statistics (unbiased variance) only
        assert bn.running_mean[c].item() == pytest.approx(0.1 * mean, rel=1e-4)
        assert bn.running_var[c].item() == pytest.approx(0.9 + 0.1 * vals.var(ddof=1), rel=1e-4)
    bn.eval()  # evaluation: running statistics, hidden voxels still 0
    ev = sparse_batch_norm(bn, x, visible)
    torch.testing.assert_close(ev, bn(x) * visible)


def test_hidden_input_voxels_reach_no_visible_feature():
    """The input is masked before the first conv and every conv output is masked: changing hidden voxels changes
    no feature at any scale (training mode, so the visible-only BatchNorm statistics are included), and no gradient
    flows from the first stage's visible features back into hidden input voxels."""
    torch.manual_seed(0)
    net = SparKNet().train()
    x = torch.randn(2, 1, 32, 32, 32, requires_grad=True)
    visible = draw_mask(2, [2, 2, 2], 0.6, generator=torch.Generator().manual_seed(1))
    up = upsample_mask(visible, 16)
    other = x.detach().clone()
    other[~up.expand_as(other)] = 100.0  # hidden voxels replaced by a constant far from the data
    feats, masks = net.sparse_encode(x, visible)
    with torch.no_grad():
        feats2, _ = net.sparse_encode(other, visible)
    for f, f2, m in zip(feats, feats2, masks):
        torch.testing.assert_close(f.detach(), f2, rtol=0, atol=0)
        assert torch.all(f.detach()[~m.expand_as(f)] == 0)  # hidden positions are empty at every scale
        assert m.shape[2:] == f.shape[2:]
    (feats[0] * masks[0]).sum().backward()
    assert torch.all(x.grad[~up] == 0) and torch.any(x.grad[up] != 0)


def test_loss_is_per_cell_normalised_mse_on_hidden_cells_only():
    """Two 16^3 cells: the visible one may be predicted anything; the hidden one holds +-1 alternating (mean 0,
    unbiased variance 4096/4095), predicted 0: loss = mean(target^2) = 1 / (4096/4095 + 1e-6)."""
    image = torch.zeros(1, 1, 32, 16, 16)
    image[0, 0, :16] = torch.randn(16, 16, 16) * 4 + 7  # visible cell: any values
    pattern = (torch.arange(16 * 16 * 16) % 2 * 2 - 1).float().view(16, 16, 16)
    image[0, 0, 16:] = pattern * 3 + 10  # hidden cell: normalisation removes scale and offset
    visible = torch.tensor([True, False]).view(1, 1, 2, 1, 1)
    pred = torch.zeros_like(image)
    expected = 1 / (4096 / 4095 + 1e-6)
    mean, std = cell_stats(image)
    assert mean[0, 0, 1, 0, 0].item() == pytest.approx(10.0)
    assert std[0, 0, 1, 0, 0].item() == pytest.approx(3 * (4096 / 4095) ** 0.5, rel=1e-6)
    assert spark_loss(pred, image, visible).item() == pytest.approx(expected, rel=1e-6)
    pred[0, 0, :16] = 1e3  # anything in the visible cell: no change
    assert spark_loss(pred, image, visible).item() == pytest.approx(expected, rel=1e-6)
    pred[0, 0, 16:] = pattern  # the hidden cell predicted exactly (up to the variance's eps): ~0
    assert spark_loss(pred, image, visible).item() < 1e-3


def test_objective_draws_the_ratio_and_trains():
    torch.manual_seed(0)
    net = SparKNet()
    seen = {}

    def student(image, visible):
        seen["visible"] = visible
        return net.masked_forward(image, visible)

    out = SparKLoss(mask_ratio=0.6)(student, None, {"image": torch.randn(2, 1, 32, 32, 48)}, 1)
    assert seen["visible"].shape == (2, 1, 2, 2, 3) and seen["visible"].sum().item() == 2 * (12 - 7)
    assert out["loss"].requires_grad and out["loss_masked_mse"].item() == pytest.approx(out["loss"].item())
    out["loss"].backward()
    assert net.spark_mask_token[0].grad is not None and net.encoder[0][0].weight.grad.abs().sum() > 0
    with pytest.raises(KeyError, match="'image'"):
        SparKLoss()(student, None, {"view1": torch.zeros(1)}, 1)


def test_inference_keeps_visible_cells_and_is_deterministic():
    torch.manual_seed(0)
    net = SparKNet().eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        y1, y2 = net(x), net(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    up = upsample_mask(net.eval_mask(x), 16)
    assert up.float().mean().item() == pytest.approx(3 / 8)  # round(0.6 * 8) = 5 of 8 cells hidden
    torch.testing.assert_close(y1[up], x[up], rtol=0, atol=0)
    assert not torch.allclose(y1[~up], x[~up])
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.zeros(1, 1, 24, 32, 32))


def test_encoder_names_are_the_vnets():
    """The encoder's tensors carry the VNet's names and shapes; the SparK decoder and densify layers are spark_*."""
    net, vnet = SparKNet().state_dict(), VNet().state_dict()
    enc = {k: v.shape for k, v in vnet.items() if k.startswith("encoder.")}
    assert {k: v.shape for k, v in net.items() if k.startswith("encoder.")} == enc
    assert all(k.startswith(("encoder.", "spark_")) for k in net)
    with pytest.raises(ValueError, match="norm"):
        SparKNet(norm="instance")


def test_torchscript_equals_eager():
    """``torch.jit.script`` compiles SparKNet (the bundle's model.ts, the zoo verifier's export) and gives the eager
    numbers exactly: the reconstruction in evaluation, the prediction and BatchNorm update over visible voxels in
    training. (TorchScript's isinstance does not recognise a module type's variants, e.g. a BatchNorm3d of another
    width, so a scripted sparse stage that told its layers apart that way would silently skip masks.)"""
    torch.manual_seed(0)
    net = SparKNet().eval()
    scripted = torch.jit.script(net)
    x = torch.randn(2, 1, 32, 32, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), rtol=0, atol=0)
    visible = draw_mask(2, [2, 2, 3], 0.6, generator=torch.Generator().manual_seed(2))
    eager, compiled = SparKNet().train(), torch.jit.script(SparKNet().train())
    eager.load_state_dict(net.state_dict())
    compiled.load_state_dict(net.state_dict())
    torch.testing.assert_close(compiled.masked_forward(x, visible), eager.masked_forward(x, visible), rtol=0, atol=0)
    stats = "encoder.1.down.1.running_var"  # moved towards the visible voxels' variance, the same way
    assert not torch.equal(eager.state_dict()[stats], net.state_dict()[stats])
    torch.testing.assert_close(compiled.state_dict()[stats], eager.state_dict()[stats], rtol=0, atol=0)
