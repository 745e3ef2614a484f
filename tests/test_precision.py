"""medssl.precision: the mode chosen per device and CPU, what runs in bf16, fp32 weights and losses, channels-last,
and the bundles' ``amp`` / ``channels_last`` switches (``--amp false`` is fp32)."""

import logging

import numpy as np
import pytest
import torch
from helpers import TINY, bundle_cmd, configs

from medssl import precision as P
from medssl.engines import SemiSupervisedTrainer
from medssl.networks import VNet

NATIVE_BF16 = P.cpu_bf16_support()[0]


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(P, "_logged", set())


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"avx512f", "avx512_bf16"}, "bf16"),  # Cooper Lake / Zen 4 and later
        ({"avx512f", "amx_bf16", "amx_tile"}, "bf16"),  # Sapphire Rapids
        ({"fp", "asimd", "bf16"}, "bf16"),  # aarch64 with BF16 (Graviton 3, Neoverse V1)
        ({"avx2", "avx512f", "fma"}, "fp32"),  # AVX-512 without bf16: emulated, slower
        (set(), "fp32"),  # nothing known
    ],
)
def test_mode_chosen_on_a_cpu_with_and_without_native_bf16(flags, expected, monkeypatch, fresh_log, caplog):
    monkeypatch.setattr(P, "_cpu_flags", lambda: flags)
    with caplog.at_level(logging.INFO, logger="medssl"):
        assert P.resolve_precision(True, "cpu") == expected
        assert P.resolve_precision("true", torch.device("cpu")) == expected  # logged once, not twice
        assert P.resolve_precision(False, "cpu") == "fp32"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Precision:")]
    assert len(lines) == 2 and lines[0].startswith(f"Precision: {expected} on cpu (")
    assert lines[1] == "Precision: fp32 on cpu (amp is off)."
    if expected == "fp32":
        assert "no native bf16" in lines[0]


def test_amp_is_parsed_strictly_and_cuda_keeps_fp16(fresh_log):
    for off in (False, "false", "False", "no", "0", 0):
        assert P.resolve_precision(off, "cpu") == "fp32"
    assert P.resolve_precision(True, torch.device("cuda")) == "fp16"
    assert P.resolve_precision("false", "cuda") == "fp32"
    with pytest.raises(ValueError, match="amp must be true or false, got 'maybe'"):
        P.resolve_precision("maybe", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        P.MixedPrecision(torch.nn.Identity(), "fp8")
    with pytest.raises(ValueError, match="channels_last must be true or false"):
        P.MixedPrecision(torch.nn.Identity(), "fp32", channels_last="sometimes")


def _small_vnet(**kw):
    torch.manual_seed(0)
    return VNet(n_filters=4, dropout=0.0, **kw)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_bf16_runs_the_convolutions_only_and_returns_fp32():
    net = _small_vnet().train()
    dtypes = {}
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d, torch.nn.BatchNorm3d)):
            m.register_forward_hook(lambda mod, i, o: dtypes.setdefault(type(mod).__name__, set()).add(o.dtype))
    x = torch.randn(2, 1, 48, 32, 16, generator=torch.Generator().manual_seed(1))  # bottleneck depth 3
    ref_net = _small_vnet().train()
    ref = ref_net(x)
    out = P.MixedPrecision(net, "bf16", channels_last=True)(x)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert dtypes["Conv3d"] == {torch.bfloat16} and dtypes["ConvTranspose3d"] == {torch.bfloat16}
    # parameters, and BatchNorm's running statistics, stay fp32; the statistics match fp32's to bf16 rounding
    assert all(p.dtype == torch.float32 for p in net.parameters())
    for (name, b), (_, rb) in zip(net.named_buffers(), ref_net.named_buffers()):
        if name.endswith("running_mean"):
            assert b.dtype == torch.float32
            torch.testing.assert_close(b, rb, atol=2e-2, rtol=5e-2)
    # inference (running statistics): the logits agree with fp32 to bf16 precision (8-bit mantissa, ~20 layers).
    # (A randomly initialised BatchNorm network in training mode amplifies any perturbation layer by layer, so the
    # training-mode logits are compared through training itself: the bundles' accuracy parity on the dev split.)
    net.eval(), ref_net.eval()
    with torch.no_grad():
        out, ref = P.MixedPrecision(net, "bf16", channels_last=True)(x), ref_net(x)
    err = (out - ref).abs().max().item() / ref.abs().max().item()
    assert 0 < err < 0.02, err
    assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.99


def test_channels_last_changes_layout_not_values_nor_weights_on_disk():
    net = P.prepare_network(_small_vnet().eval(), "cpu", channels_last=True)
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv3d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    plain = _small_vnet().eval()
    plain.load_state_dict(net.state_dict(), strict=True)  # the weights load into an ordinary network
    x = torch.randn(1, 1, 32, 32, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(P.MixedPrecision(net, "fp32", True)(x), plain(x), rtol=1e-4, atol=1e-5)
    assert P.precision_proxy(net, "fp32", False) is net  # nothing to change: the network itself


class DtypeRecordingObjective(torch.nn.Module):
    """Records the dtypes an objective sees from the student and teacher; a real loss on the student's logits."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, student, teacher, image_l, label_l, image_u, iteration):
        out = student(torch.cat([image_l, image_u]))
        with torch.no_grad():
            tea = teacher(image_u)
        self.seen.append((out["logits"].dtype, tea["logits"].dtype, torch.is_autocast_enabled("cpu")))
        loss = torch.nn.functional.cross_entropy(out["logits"][: len(image_l)], label_l[:, 0].long())
        return {"loss": loss, "pred": out["logits"][: len(image_l)]}


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_bf16_training_step_keeps_fp32_weights_and_a_finite_fp32_loss():
    from medssl.networks import HeadsForward, ema_copy

    net = P.prepare_network(_small_vnet(), "cpu", channels_last=True)
    teacher = ema_copy(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    labeled = [{"image": torch.randn(1, 16, 16, 16, generator=g), "label": torch.randint(0, 2, (1, 16, 16, 16))}] * 2
    unlabeled = [{"image": torch.randn(1, 16, 16, 16, generator=g)}] * 2
    objective = DtypeRecordingObjective()
    trainer = SemiSupervisedTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=2,
        train_data_loader=torch.utils.data.DataLoader(labeled, batch_size=2),
        unlabeled_data_loader=torch.utils.data.DataLoader(unlabeled, batch_size=2),
        network=HeadsForward(net),
        teacher=teacher,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=objective,
        precision="bf16",
        channels_last=True,
    )
    trainer.run()
    # the objective saw fp32 outputs, outside autocast (its losses are fp32)
    assert objective.seen == [(torch.float32, torch.float32, False)] * 2
    loss = trainer.state.output[0]["loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    after = net.state_dict()
    assert all(v.dtype == before[k].dtype for k, v in after.items())
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in net.parameters())
    assert any(not torch.equal(after[k], before[k]) for k in after if k.endswith("weight"))  # it learned


def test_bundle_amp_default_and_amp_false(tmp_path):
    """la_seg_finetune on the sample set: the default is bf16 where the CPU has it (named in the log), ``--amp
    false`` is fp32 without MONAI's CUDA AMP path (no GradScaler/autocast warnings); weights on disk are fp32."""
    from medssl.lab.sample_data import sample_data

    data = sample_data(tmp_path / "data", num_cases=4, shape=(40, 40, 32), num_test=1)
    logs = {}
    for mode, extra in (("default", []), ("fp32", ["--amp", "false"])):
        root = tmp_path / mode
        proc = bundle_cmd(
            "run",
            "--config_file",
            configs("la_seg_finetune", "train"),
            "--bundle_root",
            root,
            "--dataset_dir",
            data,
            "--num_labeled",
            2,
            "--max_iterations",
            2,
            "--batch_size",
            2,
            *TINY,
            *extra,
        )
        logs[mode] = proc.stdout
        state = torch.load(root / "models" / "model.pt", weights_only=True)
        assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())
        losses = [float(x) for x in __import__("re").findall(r"train_loss: ([-0-9.eE+naif]+)", proc.stdout)]
        assert len(losses) == 2 and np.isfinite(losses).all()
    expected = "bf16" if NATIVE_BF16 else "fp32"
    assert logs["default"].count("Precision: ") == 1 and f"Precision: {expected} on cpu" in logs["default"]
    assert "Precision: fp32 on cpu (amp is off)." in logs["fp32"]
    for log in logs.values():
        assert "GradScaler" not in log and "autocast" not in log.replace("bf16 autocast", "")
    bad = bundle_cmd(
        "run",
        "--config_file",
        configs("la_seg_finetune", "train"),
        "--bundle_root",
        tmp_path / "bad",
        "--dataset_dir",
        data,
        "--num_labeled",
        2,
        "--max_iterations",
        1,
        *TINY,
        "--amp",
        "maybe",
        check=False,
    )
    assert bad.returncode != 0 and "amp must be true or false, got 'maybe'" in bad.stdout


def _poison_freed_memory(value):
    """Leave freed heap blocks full of ``value``, as a long training does, so that a kernel reading memory it never
    wrote shows it."""
    for n in (1 << 10, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22):
        t = torch.full((n,), value)
        del t


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
@pytest.mark.parametrize("poison", [float("nan"), 1000.0])
def test_bf16_weight_gradient_of_depth_2_convolutions_is_right(poison):
    """oneDNN's bf16 weight gradient of a 3x3x3 convolution over a depth-2 input reads memory it never wrote (the
    VNet bottleneck at a 32^3 patch: NaN or silently wrong gradients); under MixedPrecision such convolutions run
    in fp32, so every gradient matches fp32's to bf16 precision whatever the freed memory holds."""
    torch.manual_seed(0)
    conv = torch.nn.Sequential(
        torch.nn.Conv3d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(16, 4, 3, padding=1)
    )
    ref_conv = __import__("copy").deepcopy(conv)
    x = torch.randn(2, 16, 2, 4, 4)
    ref_conv(x).square().sum().backward()
    mixed = P.MixedPrecision(conv, "bf16")
    for _ in range(3):
        conv.zero_grad()
        _poison_freed_memory(poison)
        mixed(x).square().sum().backward()
        for p, rp in zip(conv.parameters(), ref_conv.parameters()):
            assert torch.isfinite(p.grad).all()
            torch.testing.assert_close(p.grad, rp.grad, rtol=0.05, atol=0.05 * rp.grad.abs().max().item())
    # inputs of other depths keep bf16 (the guard touches only depth 2)
    seen = []
    conv[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    mixed(torch.randn(2, 16, 4, 4, 4)), mixed(x)
    assert seen == [torch.bfloat16, torch.float32]


def test_a_onednn_cap_below_bf16_means_fp32(monkeypatch):
    """ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 (a CPU without bf16, or one emulating it): bf16 would be emulated, so
    amp resolves to fp32 on the CPU; a cap at or above it leaves the CPU's own answer."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_vnni")
    native, why = P.cpu_bf16_support()
    assert not native and "capped at AVX512_CORE_VNNI" in why
    assert P.resolve_precision(True, "cpu") == "fp32"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert P.cpu_bf16_support()[0] == NATIVE_BF16
