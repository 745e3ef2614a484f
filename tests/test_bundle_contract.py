"""The bundle contract of DESIGN.md, for every trainable bundle, through ``python -m monai.bundle`` subprocesses:
metadata, network I/O, properties, train -> evaluate -> inference, TorchScript export, the common override set."""

import csv
import json
import re
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import BUNDLES, TINY, bundle_cmd, configs

from medssl.metrics import case_metrics
from medssl.precision import cpu_bf16_support
from medssl.networks import VNet
from medssl.lab.sample_data import sample_data

TRAINABLE = ["la_seg_finetune", "cvrl_semisup", "simcvd_distill"]
PRETRAINING = ["pcrl_pretrain", "spark_pretrain"]
# what each bundle needs beyond the shared test overrides: a small PCRL queue; the label count of the others
EXTRA = {"pcrl_pretrain": ["--queue_size", "64"], "spark_pretrain": []}


@pytest.fixture(scope="module")
def sample_dir(module_tmp):
    out = sample_data(module_tmp("sample"), num_cases=6, shape=(48, 48, 32), num_test=2)
    d = json.loads((out / "dataset.json").read_text())
    d["validation"] = d["test"][:1]
    (out / "dataset.json").write_text(json.dumps(d))
    return out


@pytest.fixture(scope="module", params=TRAINABLE)
def trained(request, sample_dir, module_tmp):
    """2 iterations on the sample set (2 labeled of 4), validation every iteration, a checkpoint each one."""
    name = request.param
    root = module_tmp(name)
    proc = bundle_cmd(
        "run",
        "--config_file",
        configs(name, "train"),
        "--bundle_root",
        root,
        "--dataset_dir",
        sample_dir,
        "--num_labeled",
        2,
        "--max_iterations",
        2,
        "--val_interval",
        1,
        "--save_interval",
        1,
        "--batch_size",
        2,
        *TINY,
    )
    yield name, root, proc.stdout
    shutil.rmtree(root)  # one trained bundle on disk at a time


@pytest.mark.parametrize("name", TRAINABLE + PRETRAINING)
def test_verify_metadata(name, schema_path):
    proc = bundle_cmd(
        "verify_metadata", "--meta_file", BUNDLES / name / "configs" / "metadata.json", "--filepath", schema_path
    )
    assert "metadata is verified with no error" in proc.stdout


@pytest.mark.parametrize("name", TRAINABLE + PRETRAINING)
def test_verify_net_in_out(name):
    proc = bundle_cmd(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        BUNDLES / name / "configs" / "metadata.json",
        "--config_file",
        configs(name, "inference"),
        "--n",
        2,
        "--device",
        "cpu",
    )
    assert "data shape of network is verified with no error" in proc.stdout


@pytest.mark.parametrize("name", TRAINABLE + PRETRAINING)
@pytest.mark.parametrize(
    "names, workflow_type", [(["train"], "train"), (["inference"], "infer"), (["train", "evaluate"], "train")]
)
def test_check_properties_empty(name, names, workflow_type, sample_dir, tmp_path):
    from monai.bundle import ConfigWorkflow

    files = [str(BUNDLES / name / "configs" / f"{n}.json") for n in names]
    wf = ConfigWorkflow(
        config_file=files,
        workflow_type=workflow_type,
        meta_file=str(BUNDLES / name / "configs" / "metadata.json"),
        logging_file=str(BUNDLES / name / "configs" / "logging.conf"),
        dataset_dir=str(sample_dir),
        bundle_root=str(tmp_path),
        num_labeled=2,
        patch_size=[32, 32, 32],
        num_workers=0,
    )
    wf.initialize()
    assert wf.check_properties() == []


@pytest.mark.parametrize("name", TRAINABLE + PRETRAINING)
def test_bundle_layout(name):
    root = BUNDLES / name
    for f in [
        "LICENSE",
        "docs/README.md",
        "configs/metadata.json",
        "configs/train.json",
        "configs/evaluate.json",
        "configs/inference.json",
        "configs/multi_gpu_train.json",
        "configs/logging.conf",
    ]:
        assert (root / f).is_file(), f
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"] and "medssl" in meta["required_packages_version"]
    train = json.loads((root / "configs" / "train.json").read_text())
    for key in [
        "dataset_dir",
        "num_labeled",
        "patch_size",
        "batch_size",
        "max_iterations",
        "val_interval",
        "device",
        "output_dir",
        "ckpt_dir",
        "pretrained_ckpt",
        "resume",
        "spacing",
    ]:
        assert key in train, f"{name}/train.json lacks the common key {key!r}"
    readme = (root / "docs" / "README.md").read_text()
    for section in [  # the sections of model-zoo's bundle READMEs (order: tests/test_zoo_conventions.py)
        "# Model Overview",
        "## Data",
        "## Training configuration",
        "## Performance",
        "## MONAI Bundle Commands",
        "## Limitations",
        "# References",
        "# License",
    ]:
        assert section in readme, f"{name}/docs/README.md lacks {section}"


def test_train_outputs(trained):
    name, root, log = trained
    models = root / "models"
    state = torch.load(models / "model.pt", weights_only=True)
    VNet().load_state_dict(state, strict=True)  # the backbone only: any bundle's plain VNet loads it
    assert all(v.device.type == "cpu" for v in state.values())
    assert (models / "model_best.pt").is_file()  # validation on the "validation" list
    assert sorted(p.name for p in models.glob("checkpoint_*.pt")) == ["checkpoint_1.pt", "checkpoint_2.pt"]
    assert torch.load(models / "checkpoint_2.pt", weights_only=True)["trainer"]["iteration"] == 2
    assert log.count("Iter: 2/2 -- ") == 1 and log.count("val_mean_dice") >= 2
    assert list((root / "eval").glob("events.out.tfevents.*"))  # TensorBoard
    assert not list(models.glob(".*tmp*"))  # no temporary files left behind


def test_evaluate_and_inference_agree_with_independent_metrics(trained, sample_dir):
    name, root, _ = trained
    bundle_cmd(
        "run",
        "--config_file",
        configs(name, "train", "evaluate"),
        "--bundle_root",
        root,
        "--dataset_dir",
        sample_dir,
        *TINY,
    )
    with open(root / "eval" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["sample_004", "sample_005", "mean", "std", "n_nan"]
    # inference: largest connected component by default (the evaluation's *_lcc columns), or every component (its
    # main columns, the papers' protocol)
    for suffix, extra in (("_lcc", []), ("", ["--largest_component", "false"])):
        out = root / f"infer{suffix}"
        bundle_cmd(
            "run", "--config_file", configs(name, "inference"), "--bundle_root", root, "--dataset_dir", sample_dir,
            "--output_dir", out, *TINY, *extra,
        )
        for row in rows[:2]:
            image = nib.load(sample_dir / "imagesTr" / f"{row['case']}.nii.gz")
            pred = nib.load(out / f"{row['case']}_seg.nii.gz")
            assert pred.shape == image.shape and pred.get_data_dtype() == np.uint8
            np.testing.assert_allclose(pred.affine, image.affine)
            assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}
            label = np.asarray(nib.load(sample_dir / "labelsTr" / f"{row['case']}.nii.gz").dataobj)
            # distances in mm (the default distance_unit) from the image's own voxel size
            spacing = image.header.get_zooms()[:3]
            for k, v in case_metrics(np.asarray(pred.dataobj), label, spacing=spacing).items():
                column = f"{k}{suffix}_mm" if k in ("hd95", "asd") else k + suffix
                assert float(row[column]) == pytest.approx(v, abs=1e-5, nan_ok=True), (row["case"], column)
    assert float(rows[2]["dice"]) == pytest.approx(np.mean([float(r["dice"]) for r in rows[:2]]), abs=1e-5)


def test_ckpt_export_torchscript_equals_eager(trained, tmp_path):
    name, root, _ = trained
    ts = tmp_path / "model.ts"
    bundle_cmd(
        "ckpt_export",
        "network_def",
        "--filepath",
        ts,
        "--ckpt_file",
        root / "models" / "model.pt",
        "--meta_file",
        BUNDLES / name / "configs" / "metadata.json",
        "--config_file",
        configs(name, "inference"),
        "--bundle_root",
        root,
    )
    scripted = torch.jit.load(str(ts))
    eager = VNet().eval()
    eager.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    x = torch.randn(1, 1, 32, 48, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", TRAINABLE)
def test_common_override_set_on_real_la(name, la_dir, tmp_path):
    """The foundation issue's override set works for every train.json (bundle_root moved to tmp)."""
    proc = bundle_cmd(
        "run",
        "--config_file",
        f"bundles/{name}/configs/train.json",
        "--dataset_dir",
        la_dir,
        "--num_labeled",
        16,
        "--patch_size",
        "[32,32,32]",
        "--max_iterations",
        2,
        "--val_interval",
        1,
        "--bundle_root",
        tmp_path,
    )
    assert (tmp_path / "models" / "model.pt").is_file()
    assert "Iter: 2/2" in proc.stdout


@pytest.mark.parametrize("name", TRAINABLE + PRETRAINING)
def test_torchrun_two_cpu_processes(name, sample_dir, tmp_path):
    """multi_gpu_train.json under torchrun with 2 CPU processes (gloo): both ranks train, rank 0 alone writes."""
    import re
    import subprocess
    import sys

    from helpers import REPO

    extra = EXTRA.get(name, ["--num_labeled", "2"])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        configs(name, "train", "multi_gpu_train"),
        "--bundle_root",
        str(tmp_path),
        "--dataset_dir",
        str(sample_dir),
        "--max_iterations",
        "3",
        "--save_interval",
        "2",
        "--batch_size",
        "1",
        *map(str, TINY + extra),
        "--finalize",  # after training, each rank saves the weights it ends with
        '[\'$torch.save(getattr(@network, "module", @network).state_dict(), '
        "@bundle_root + \"/rank%d.pt\" % dist.get_rank())', '$dist.destroy_process_group()']",
    ]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert proc.stdout.count("Engine run finished") == 2  # both ranks ran to the end
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["checkpoint_2.pt", "model.pt"]
    writers = {p.name.split(".")[4] for p in (tmp_path / "eval").glob("events.out.tfevents.*")}
    assert len(writers) == 1  # one process wrote TensorBoard logs
    assert len(re.findall(r"Iter: 3/3 -- ", proc.stdout)) == 1  # one process logged
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) > 200
    # the ranks trained on different samples (sharded sampler), yet hold identical weights (DDP all-reduces the
    # gradients). Only BatchNorm running statistics may differ: DDP copies rank 0's buffers to every rank at the
    # start of each forward, so each rank's last forward leaves its own; rank 0's are the ones released.
    differ = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert all(k.endswith(("running_mean", "running_var")) for k in differ), differ
    assert sum(not k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in rank0) > 100


@pytest.mark.parametrize("name", TRAINABLE + PRETRAINING)
def test_tracking_mlflow_sqlite(name, sample_dir, tmp_path):
    """`--tracking mlflow` with a local SQLite store: a finished run with the per-iteration loss and the config."""
    mlflow = pytest.importorskip("mlflow", reason="mlflow is the 'tracking' extra (installed by the test extra)")
    db = tmp_path / "mlflow.db"
    extra = EXTRA[name] + ["--batch_size", "2"] if name in EXTRA else ["--num_labeled", "2"]
    bundle_cmd(
        "run",
        "--config_file",
        configs(name, "train"),
        "--bundle_root",
        tmp_path,
        "--dataset_dir",
        sample_dir,
        "--max_iterations",
        2,
        "--tracking",
        "mlflow",
        "--tracking_uri",
        f"sqlite:///{db}",
        "--experiment_name",
        f"medssl_{name}",
        *TINY,
        *extra,
    )
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name(f"medssl_{name}")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2] and all(np.isfinite(m.value) for m in history)
    (artifact,) = [a.path for a in client.list_artifacts(run.info.run_id) if a.path.endswith(".json")]
    local = client.download_artifacts(run.info.run_id, artifact, str(tmp_path))
    config = json.loads(open(local).read())
    assert config["max_iterations"] == 2 and config["dataset_dir"] == str(sample_dir)


@pytest.mark.parametrize("name", TRAINABLE + PRETRAINING)
def test_kill_and_resume_matches_uninterrupted_run(name, sample_dir, tmp_path):
    """SIGKILL mid-training, resume from the newest checkpoint: same total iterations, no corrupt checkpoint, and
    the final weights equal an uninterrupted run's exactly (one thread, loaders in the main process: the data
    order, augmentations, dropout masks and EMA continue where they stopped). Both run in the bundles' default
    precision: bf16 on a CPU with native bf16, so resume is pinned across a bf16 run there."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from helpers import REPO

    extra = EXTRA.get(name, ["--num_labeled", "2"])
    args = [
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        configs(name, "train"),
        "--dataset_dir",
        str(sample_dir),
        "--max_iterations",
        "8",
        "--save_interval",
        "2",
        "--batch_size",
        "2",
        *map(str, TINY + extra),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    straight_log = bundle_cmd(*args[2:], "--bundle_root", tmp_path / "straight", env=env).stdout
    assert f"Precision: {'bf16' if cpu_bf16_support()[0] else 'fp32'} on cpu" in straight_log
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, *args, "--bundle_root", str(killed)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (killed / "models" / "checkpoint_4.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before its second checkpoint"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    models = killed / "models"
    assert not (models / "model.pt").exists()  # an interrupted run never looks finished
    for ckpt in models.glob("checkpoint_*.pt"):  # every checkpoint present is complete (temp file + rename)
        assert torch.load(ckpt, weights_only=True)["trainer"]["iteration"] == int(ckpt.stem.split("_")[1])
    done = bundle_cmd(*args[2:], "--bundle_root", killed, "--resume", "true", env=env)
    resumed = int(re.search(r"resumed from .*checkpoint_(\d+)\.pt \(iteration (\d+)\)", done.stdout).group(2))
    assert resumed >= 4 and "Iter: 1/8" not in done.stdout and f"Iter: {resumed + 1}/8" in done.stdout
    assert torch.load(models / "checkpoint_8.pt", weights_only=True)["trainer"]["iteration"] == 8
    straight = torch.load(tmp_path / "straight" / "models" / "model.pt", weights_only=True)
    final = torch.load(models / "model.pt", weights_only=True)
    assert set(final) == set(straight)
    worst = max((final[k].double() - straight[k].double()).abs().max().item() for k in final)
    assert worst == 0.0, f"resumed weights differ from the uninterrupted run by up to {worst}"
    refused = bundle_cmd(*args[2:], "--bundle_root", killed, "--resume", "false", check=False, env=env)
    assert refused.returncode != 0 and "pass --resume true to continue it" in refused.stdout
