"""TrainingCheckpoint (atomic resume checkpoints, final weights) and MetricsTable (per-case CSV)."""

import csv
import logging

import pytest
import torch
from ignite.engine import Engine, Events
from medssl.data import DataError
from medssl.handlers import MetricsTable, TrainingCheckpoint, latest_checkpoint


def _engine(net, opt, fail_at=None):
    def step(engine, batch):
        if engine.state.iteration == fail_at:
            raise RuntimeError("pre-empted")
        opt.zero_grad()
        loss = net(torch.ones(1, 2)).sum()
        loss.backward()
        opt.step()
        return loss.item()

    return Engine(step)


def test_checkpoints_rotate_and_final_weights(tmp_path):
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    engine = _engine(net, opt)
    TrainingCheckpoint(str(tmp_path), {"model": net, "optimizer": opt}, save_interval=2, n_saved=2).attach(engine)
    engine.run(range(7), max_epochs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_4.pt", "checkpoint_6.pt", "model.pt"]
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint_6.pt")
    final = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(final) == {"weight", "bias"} and torch.equal(final["weight"], net.weight.detach())
    ckpt = torch.load(tmp_path / "checkpoint_6.pt", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 6 and set(ckpt) == {"model", "optimizer", "trainer"}


def test_no_final_weights_on_exception_and_resume(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    engine = _engine(net, opt, fail_at=4)
    TrainingCheckpoint(str(tmp_path), {"model": net, "optimizer": opt}, save_interval=1).attach(engine)
    with pytest.raises(RuntimeError, match="pre-empted"):
        engine.run(range(6), max_epochs=1)
    assert not (tmp_path / "model.pt").exists()  # an interrupted run never looks finished
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint_3.pt")

    # a fresh run into the same folder is refused, a resumed one continues to the same total
    net2 = torch.nn.Linear(2, 1)
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(FileExistsError, match="pass --resume true"):
        TrainingCheckpoint(str(tmp_path), {"model": net2, "optimizer": opt2}, save_interval=1).attach(
            _engine(net2, opt2)
        )
    engine2 = _engine(net2, opt2)
    TrainingCheckpoint(str(tmp_path), {"model": net2, "optimizer": opt2}, save_interval=1, resume=True).attach(engine2)
    engine2.run(range(6), max_epochs=1)
    assert engine2.state.iteration == 6
    # the same 6 SGD steps without interruption give the same weights (deterministic step)
    torch.manual_seed(0)
    ref = torch.nn.Linear(2, 1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    _engine(ref, ref_opt).run(range(6), max_epochs=1)
    torch.testing.assert_close(net2.weight, ref.weight, rtol=0, atol=0)


def test_metrics_table(tmp_path, caplog):
    from monai.data import MetaTensor

    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def details(e):  # what MONAI metric handlers leave in the state (attached before the table)
        e.state.metric_details = {
            "dice": torch.tensor([[0.5], [0.7], [0.9]]),
            "hd95": torch.tensor([[2.0], [float("nan")], [4.0]]),
        }

    MetricsTable(str(tmp_path), metrics=["dice", "hd95"]).attach(engine)
    batches = [
        [{"image": MetaTensor(torch.zeros(1), meta={"filename_or_obj": f"/d/case{i}.nii.gz"})}] for i in (1, 2, 3)
    ]
    with caplog.at_level(logging.INFO, logger="medssl"):
        engine.run(batches, max_epochs=1)
    rows = list(csv.reader(open(tmp_path / "metrics.csv")))
    assert rows[0] == ["case", "dice", "hd95"]
    assert [r[0] for r in rows[1:]] == ["case1", "case2", "case3", "mean", "std", "n_nan"]
    assert float(rows[4][1]) == pytest.approx(0.7) and float(rows[4][2]) == pytest.approx(3.0)  # NaN left out
    assert float(rows[5][1]) == pytest.approx(0.163299, abs=1e-6)
    assert rows[6] == ["n_nan", "0", "1"]
    assert "per-case metrics" in caplog.text


def test_metrics_table_per_class_and_mm(tmp_path):
    """Three foreground classes: the case's mean over classes (NaN if one class is NaN), then one column per class
    named after its label; distance columns carry _mm when the distances are in mm."""
    from monai.data import MetaTensor

    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def details(e):
        e.state.metric_details = {
            "dice": torch.tensor([[0.9, 0.6, 0.3], [0.8, 0.7, 0.0]]),
            "hd95": torch.tensor([[1.0, 2.0, 6.0], [3.0, 5.0, float("nan")]]),
        }

    labels = {"0": "background", "1": {"name": "Liver"}, "2": "spleen", "3": "left kidney"}
    MetricsTable(str(tmp_path), metrics=["dice", "hd95"], labels=labels, distance_unit="mm").attach(engine)
    batches = [[{"image": MetaTensor(torch.zeros(1), meta={"filename_or_obj": f"/d/ct{i}.nii.gz"})}] for i in (1, 2)]
    engine.run(batches, max_epochs=1)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert list(rows[0]) == [
        "case", "dice", "dice_liver", "dice_spleen", "dice_left_kidney",
        "hd95_mm", "hd95_mm_liver", "hd95_mm_spleen", "hd95_mm_left_kidney",
    ]  # fmt: skip
    assert float(rows[0]["dice"]) == pytest.approx(0.6) and float(rows[1]["dice"]) == pytest.approx(0.5)
    assert float(rows[0]["hd95_mm"]) == pytest.approx(3.0) and rows[1]["hd95_mm"] == "nan"
    mean = rows[2]
    assert float(mean["dice_spleen"]) == pytest.approx(0.65) and float(mean["hd95_mm"]) == pytest.approx(3.0)
    assert rows[4]["hd95_mm"] == "1" and rows[4]["hd95_mm_left_kidney"] == "1" and rows[4]["dice"] == "0"
    # names that cannot tell the classes apart fall back to the label values
    table = MetricsTable(str(tmp_path), metrics=["dice"], labels={"0": "bg", "1": "left kidney", "2": "left-kidney", "3": "b"}).table(
        {"dice": torch.tensor([[0.1, 0.2, 0.3]])}
    )
    assert list(table) == ["dice", "dice_1", "dice_2", "dice_3"]
    with pytest.raises(DataError, match="distance_unit: 'cm' is not a distance unit"):
        MetricsTable(str(tmp_path), distance_unit="cm")


def test_training_rng_round_trip_through_weights_only(tmp_path):
    import random

    import numpy as np
    from monai.transforms import Compose, OneOf, RandFlipd, RandSpatialCropd

    from medssl.data import InfiniteSampler
    from medssl.handlers import TrainingRNG

    pipeline = Compose(
        [
            RandSpatialCropd("image", roi_size=[2, 2, 2], random_size=False),
            OneOf([RandFlipd("image", prob=1.0, spatial_axis=0), RandFlipd("image", prob=1.0, spatial_axis=1)]),
        ]
    )
    pipeline.set_random_state(5)
    sampler = InfiniteSampler(4, seed=1)
    rng = TrainingRNG([pipeline], [sampler], [3])
    # the crop keeps its draws in an inner transform (RandSpatialCropd.cropper): it must be found too
    cropper = pipeline.transforms[0].cropper
    assert [type(t).__name__ for t in rng.transforms] == [
        "Compose",
        "RandSpatialCropd",
        "RandSpatialCrop",
        "OneOf",
        "RandFlipd",
        "RandFlipd",
    ]
    assert any(t is cropper for t in rng.transforms)
    torch.save({"rng": rng.state_dict()}, tmp_path / "c.pt")

    def draws():
        return (
            torch.rand(2).tolist(),
            np.random.rand(),
            random.random(),
            cropper.R.rand(),
            pipeline.transforms[1].R.rand(),
        )

    before = draws()
    rng.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True)["rng"])
    assert draws() == before
    rng.resume_at(iteration=2)
    assert sampler.start == 6
    with pytest.raises(ValueError, match="holds 6 transform states, this pipeline has 0"):
        TrainingRNG().load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True)["rng"])
