"""The semi-supervised engine: two streams, counts per batch, cycling, no labels for unlabeled data, EMA."""

import collections

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, EnsureTyped, LoadImaged

from medssl.data import InfiniteSampler, write_nifti
from medssl.engines import SemiSupervisedTrainer
from medssl.handlers import EMATeacher


class RecordingObjective(torch.nn.Module):
    """Records what each iteration received; a real loss so the optimizer has gradients."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, student, teacher, image_l, label_l, image_u, iteration):
        self.seen.append((image_l[:, 0, 0, 0, 0].tolist(), label_l.shape, image_u[:, 0, 0, 0, 0].tolist(), iteration))
        pred = student(torch.cat([image_l, image_u]))
        return {"loss": pred.mean(), "pred": pred[: len(image_l)], "loss_extra": torch.tensor(1.5)}


def _volumes(tmp_path, n, value0, with_label):
    entries = []
    for i in range(n):
        image = np.full((4, 4, 4), value0 + i, np.float32)  # the case id is readable from any voxel
        write_nifti(image, np.eye(4), tmp_path / f"img{value0 + i}.nii.gz")
        entry = {"image": str(tmp_path / f"img{value0 + i}.nii.gz")}
        if with_label:
            write_nifti(np.zeros((4, 4, 4), np.uint8), np.eye(4), tmp_path / f"lab{value0 + i}.nii.gz")
            entry["label"] = str(tmp_path / f"lab{value0 + i}.nii.gz")
        else:
            entry["label"] = str(tmp_path / "does_not_exist.nii.gz")  # must never be opened
        entries.append(entry)
    return entries


def test_two_streams_counts_cycling_and_no_unlabeled_labels(tmp_path):
    labeled = _volumes(tmp_path, 3, 0, with_label=True)
    unlabeled = [{"image": e["image"]} for e in _volumes(tmp_path, 5, 100, with_label=False)]
    load = Compose(
        [
            LoadImaged(["image", "label"], ensure_channel_first=True, allow_missing_keys=True),
            EnsureTyped(["image", "label"], track_meta=False, allow_missing_keys=True),
        ]
    )
    lab_ds, unl_ds = Dataset(labeled, load), Dataset(unlabeled, load)
    lab_loader = DataLoader(lab_ds, batch_size=2, sampler=InfiniteSampler(lab_ds, seed=0))
    unl_loader = DataLoader(unl_ds, batch_size=2, sampler=InfiniteSampler(unl_ds, seed=1))
    net = torch.nn.Conv3d(1, 2, 1)
    objective = RecordingObjective()
    trainer = SemiSupervisedTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=9,
        train_data_loader=lab_loader,
        unlabeled_data_loader=unl_loader,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=objective,
    )
    trainer.run()
    assert trainer.state.iteration == 9 and len(objective.seen) == 9
    assert [s[3] for s in objective.seen] == list(range(1, 10))  # the objective gets the iteration (ramp-ups)
    for lab_ids, label_shape, unl_ids, _ in objective.seen:
        assert len(lab_ids) == 2 and len(unl_ids) == 2 and label_shape == (2, 1, 4, 4, 4)
        assert all(0 <= i < 3 for i in lab_ids) and all(100 <= i < 105 for i in unl_ids)
    lab_counts = collections.Counter(i for s in objective.seen for i in s[0])
    unl_counts = collections.Counter(i for s in objective.seen for i in s[2])
    assert sorted(lab_counts.values()) == [6, 6, 6]  # 18 draws from 3 cases: each pass is a permutation
    assert set(unl_counts) == {100.0, 101.0, 102.0, 103.0, 104.0}
    out = trainer.state.output[0]  # the shape of a decollated SupervisedTrainer output: MONAI defaults read it
    assert set(out) == {"image", "label", "pred", "loss", "loss_extra"} and float(out["loss_extra"]) == 1.5


def test_unlabeled_batch_needs_an_image(tmp_path):
    labeled = _volumes(tmp_path, 1, 0, with_label=True)
    load = Compose([LoadImaged(["image", "label"], ensure_channel_first=True)])
    net = torch.nn.Conv3d(1, 2, 1)
    trainer = SemiSupervisedTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=1,
        train_data_loader=DataLoader(Dataset(labeled, load), batch_size=1),
        unlabeled_data_loader=[{"img": torch.zeros(1, 1, 4, 4, 4)}],
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=RecordingObjective(),
    )
    with pytest.raises(ValueError, match=r"unlabeled batch has no 'image' key; keys: \['img'\]"):
        trainer.run()


def test_ema_teacher_update_hand_computed():
    student, teacher = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        student.weight.fill_(1.0)
        teacher.weight.fill_(0.0)
    ema = EMATeacher(student, teacher, decay=0.99)
    assert ema.update(0) == 0.0 and teacher.weight.item() == 1.0  # step 0: a copy of the student
    with torch.no_grad():
        student.weight.fill_(3.0)
    assert ema.update(1) == 0.5 and teacher.weight.item() == 2.0  # 0.5 * 1 + 0.5 * 3
    assert ema.update(3) == 0.75 and teacher.weight.item() == pytest.approx(2.25)  # 0.75 * 2 + 0.25 * 3
    assert ema.update(1000) == 0.99  # capped at the decay
    with pytest.raises(ValueError, match="differ in number or shape"):
        EMATeacher(student, torch.nn.Linear(2, 1))
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        EMATeacher(student, teacher, decay=1.0)
