"""The la_seg_finetune recipe pinned to the LA benchmark's numbers (UA-MT lineage)."""

import math

import torch
from helpers import BUNDLES
from monai.bundle import ConfigParser

CONFIG = BUNDLES / "la_seg_finetune" / "configs" / "train.json"


def _parser(**overrides):
    p = ConfigParser()
    p.read_config(str(CONFIG))
    for k, v in overrides.items():
        p[k] = v
    return p


def test_defaults_are_the_paper_recipe():
    p = _parser()
    assert p["patch_size"] == [112, 112, 80] and p["max_iterations"] == 6000 and p["num_labeled"] == 16
    opt = p.get_parsed_content("optimizer")
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.01, 0.9, 1e-4)
    sched = p.get_parsed_content("lr_scheduler")
    lrs = []
    for _ in range(6000):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # UA-MT: lr = 0.01 * 0.1 ** (iteration // 2500)
    assert all(math.isclose(lr, 0.01 * 0.1 ** (i // 2500)) for i, lr in enumerate(lrs))
    assert sum(x.numel() for x in p.get_parsed_content("network_def").parameters()) == 9_448_866


def test_loss_is_half_ce_plus_half_squared_dice():
    """0.5 * (cross-entropy + UA-MT's dice_loss on the foreground softmax, squared denominators, smooth 1e-5)."""
    loss = _parser().get_parsed_content("loss")
    # one case, two voxels: a = logits (2, -1) with label 1, b = logits (0, 1) with label 0
    logits = torch.tensor([[2.0, 0.0], [-1.0, 1.0]]).reshape(1, 2, 2, 1, 1)
    label = torch.tensor([1.0, 0.0]).reshape(1, 1, 2, 1, 1)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    pa, pb = sig(-3.0), sig(1.0)  # foreground softmax of a and b
    ce = -(math.log(pa) + math.log(1 - pb)) / 2
    dice = 1 - (2 * pa + 1e-5) / (pa**2 + pb**2 + 1 + 1e-5)
    assert math.isclose(float(loss(logits, label)), 0.5 * (ce + dice), rel_tol=1e-6)
    assert math.isclose(0.5 * (ce + dice), 1.5596, abs_tol=1e-4)  # the number itself, for the record


def test_augmentation_matches_ua_mt(tmp_path):
    """rot90 k uniform in {0..3} in-plane, then a flip of axis 0 or 1 (never z), then a random crop."""
    p = _parser(patch_size=[4, 4, 2])
    rot, flip, crop = p.get_parsed_content("train#random_transforms")[1:4]
    vol = torch.arange(6 * 6 * 3, dtype=torch.float32).reshape(1, 6, 6, 3)
    rot.set_random_state(0)
    ks = []
    for _ in range(2000):
        out = rot({"image": vol})["image"]
        ks.append(next(k for k in range(4) if torch.equal(out.as_tensor(), torch.rot90(vol, k, (1, 2)))))
    counts = [ks.count(k) / len(ks) for k in range(4)]
    assert all(abs(c - 0.25) < 0.04 for c in counts), counts
    flip.set_random_state(0)
    axes = set()
    for _ in range(50):
        out = flip({"image": vol})["image"].as_tensor()
        axes.add(next(a for a in (1, 2, 3) if torch.equal(out, vol.flip(a))))
    assert axes == {1, 2}
    assert crop({"image": vol})["image"].shape == (1, 4, 4, 2)
