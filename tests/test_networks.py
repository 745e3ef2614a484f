"""The shared VNet: reference parameter count, shapes, heads, TorchScript, pretrained loading."""

import logging

import pytest
import torch
from medssl.networks import BACKBONE_PREFIXES, VNet, load_pretrained


def test_reference_parameter_count():
    net = VNet(in_channels=1, out_channels=2, n_filters=16, norm="batch")
    assert sum(p.numel() for p in net.parameters()) == 9_448_866
    # every parameter belongs to the backbone; the SDM head adds one 1x1x1 conv (16 weights + 1 bias)
    assert all(k.startswith(BACKBONE_PREFIXES) for k in net.state_dict())
    assert sum(p.numel() for p in VNet(sdm_head=True).parameters()) == 9_448_866 + 17


def test_stage_widths_and_conv_counts():
    net = VNet()
    convs = lambda m: [c for c in m.modules() if isinstance(c, torch.nn.Conv3d) and c.kernel_size == (3, 3, 3)]  # noqa
    assert [len(convs(s)) for s in net.encoder] == [1, 2, 3, 3, 3]
    assert [len(convs(s)) for s in net.decoder] == [3, 3, 2, 1]
    assert [convs(s)[0].out_channels for s in net.encoder] == [16, 32, 64, 128, 256]
    assert [convs(s)[0].out_channels for s in net.decoder] == [128, 64, 32, 16]


def test_shapes_and_heads():
    torch.manual_seed(0)
    net = VNet(sdm_head=True, proj_dim=8).eval()
    x = torch.randn(2, 1, 32, 48, 16)
    logits = net(x)
    assert logits.shape == (2, 2, 32, 48, 16)
    out = net.forward_heads(x)
    assert torch.equal(out["logits"], logits)
    assert out["features"].shape == (2, 16, 32, 48, 16)
    assert out["bottleneck"].shape == (2, 256, 2, 3, 1)
    assert out["sdm"].shape == (2, 1, 32, 48, 16) and out["sdm"].abs().max() <= 1
    assert out["proj"].shape == (2, 8, 32, 48, 16)
    # heads sit beside the backbone: the backbone's weights load into a head-less VNet by name
    backbone = {k: v for k, v in net.state_dict().items() if k.startswith(BACKBONE_PREFIXES)}
    assert VNet().load_state_dict(backbone, strict=True)
    assert sum(p.numel() for p in net.proj_head.parameters()) == 16 * 16 + 16 + 16 * 8 + 8
    feats = net.encode(x)
    assert [f.shape[1] for f in feats] == [16, 32, 64, 128, 256]


def test_dropout_is_training_only():
    torch.manual_seed(0)
    net = VNet()
    x = torch.randn(2, 1, 32, 32, 32)
    net.train()
    a, b = net(x), net(x)
    assert not torch.allclose(a, b)  # two dropout masks
    net.eval()
    assert torch.equal(net(x), net(x))
    assert isinstance(VNet(dropout=0).dropout, torch.nn.Identity)


def test_bad_input_messages():
    net = VNet()
    with pytest.raises(ValueError, match=r"divisible by 16, got \[20, 32, 32\]"):
        net(torch.zeros(1, 1, 20, 32, 32))
    with pytest.raises(ValueError, match=r"expects input \[B, 1, H, W, D\], got \[1, 2, 16, 16, 16\]"):
        net(torch.zeros(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="norm must be one of"):
        VNet(norm="layer")


def test_torchscript_matches_eager():
    torch.manual_seed(0)
    net = VNet().eval()
    scripted = torch.jit.script(net)
    x = torch.randn(1, 1, 32, 32, 16)
    torch.testing.assert_close(scripted(x), net(x), rtol=0, atol=0)


def test_load_pretrained_counts(tmp_path, caplog):
    src = VNet(sdm_head=True)
    path = tmp_path / "w.pt"
    state = src.state_dict()
    state["projection.weight"] = torch.zeros(3)  # a head the target does not have
    torch.save({"model": state}, path)  # a resume-style checkpoint: the state dict sits under "model"
    dst = VNet(out_channels=3)  # another class count: out_conv differs in shape
    with caplog.at_level(logging.INFO, logger="medssl"):
        load_pretrained(dst, str(path))
    n_backbone = len(VNet().state_dict())
    assert f"{n_backbone - 2} tensors matched, 0 missing, 3 unexpected, 2 with another shape" in caplog.text
    for k, v in dst.state_dict().items():
        if k.startswith(("encoder.", "decoder.")):
            assert torch.equal(v, state[k]), k


def test_load_pretrained_refuses_unrelated_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="matches 0 of the network's 30 weight kernels"):
        load_pretrained(VNet(), str(path))
    load_pretrained(VNet(), str(path), min_matched=0)  # explicitly allowed
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_pretrained(VNet(), str(tmp_path / "nope.pt"))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a state dict"):
        load_pretrained(VNet(), str(tmp_path / "list.pt"))
