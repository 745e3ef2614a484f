"""The benchmark command: the smoke profile end to end (as CI runs it), resume, and the pieces on their own."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO

from medssl.lab.benchmark import PROFILES, paired_comparisons, parse_training_log, plan_runs, pool_seeds
from medssl.precision import cpu_bf16_support


def test_plan_runs_order_and_overrides(tmp_path):
    runs = plan_runs(PROFILES["cpu"], ["supervised", "pcrl+supervised", "cvrl"], [8, 16], 60, tmp_path / "d", tmp_path)
    names = [r["name"] for r in runs]
    assert names == [
        "pcrl_pretrain",
        "supervised-8",
        "supervised-16",
        "pcrl+supervised-8",
        "pcrl+supervised-16",
        "cvrl-8",
        "cvrl-16",
        "supervised-60",
    ]
    pre = runs[0]["steps"][0]["overrides"]
    assert pre["max_iterations"] == 600 and pre["batch_size"] == 4 and pre["learning_rate"] == 0.01
    ft = runs[3]["steps"][0]["overrides"]
    assert ft["pretrained_ckpt"] == str(tmp_path / "runs" / "pcrl_pretrain" / "models" / "model.pt")
    assert ft["num_labeled"] == 8 and ft["patch_size"] == [64, 64, 32] and ft["lr_step"] == 416
    assert "pretrained_ckpt" not in runs[1]["steps"][0]["overrides"]
    assert runs[5]["bundle"] == "cvrl_semisup" and runs[5]["steps"][1]["config"] == ["train", "evaluate"]
    assert PROFILES["paper"].evaluate == {"sw_stride": [18, 18, 4]}
    assert runs[5]["steps"][1]["overrides"]["distance_unit"] == "voxel"  # the LA tables: distances in voxels
    with pytest.raises(ValueError, match="unknown methods"):
        plan_runs(PROFILES["cpu"], ["magic"], [8], None, tmp_path, tmp_path)


def test_plan_runs_pretraining_comparison(tmp_path):
    """The issue-14 sweep: one run per pre-training bundle, the same iterations x batch, each with its own optimiser
    settings, and each fine-tuning starting from its own pre-training's weights."""
    methods = ["supervised", "pcrl+supervised", "spark+supervised", "spark+cvrl"]
    runs = plan_runs(PROFILES["cpu"], methods, [4, 16], None, tmp_path / "d", tmp_path)
    names = [r["name"] for r in runs]
    assert names[:2] == ["pcrl_pretrain", "spark_pretrain"] and len(names) == 2 + 4 * 2
    pcrl, spark = (r["steps"][0]["overrides"] for r in runs[:2])
    assert runs[1]["bundle"] == "spark_pretrain" and runs[1]["steps"][0]["config"] == ["train"]
    assert (pcrl["max_iterations"], pcrl["batch_size"]) == (spark["max_iterations"], spark["batch_size"]) == (600, 4)
    assert pcrl["learning_rate"] == 0.01 and "learning_rate" not in spark  # SparK keeps its own AdamW lr
    by_name = {r["name"]: r for r in runs}
    for name, pre in (("spark+supervised-4", "spark_pretrain"), ("spark+cvrl-16", "spark_pretrain")):
        ft = by_name[name]["steps"][0]["overrides"]
        assert ft["pretrained_ckpt"] == str(tmp_path / "runs" / pre / "models" / "model.pt"), name
    assert by_name["spark+cvrl-16"]["bundle"] == "cvrl_semisup"
    assert by_name["spark+supervised-4"]["dir"].endswith("spark_supervised-4")


def test_paired_comparisons_hand_case():
    """5 cases, SparK better than scratch on all: exact two-sided Wilcoxon p = 2 / 2^5 = 0.0625; SparK vs PCRL with
    differences -1, +2, -3, +4, +5 points: W- = 1 + 3 = 4, and 7 of the 32 sign patterns give a rank sum <= 4
    ({}, {1}, {2}, {3}, {1,2}, {4}, {1,3}): exact two-sided p = 14 / 32 = 0.4375."""
    scratch = [0.70, 0.80, 0.60, 0.90, 0.75]
    spark = [0.71, 0.82, 0.63, 0.94, 0.80]
    pcrl = [0.72, 0.80, 0.66, 0.90, 0.75]

    def run(method, dice):
        return {"method": method, "labels": 4, "cases": [{"case": f"c{i}", "dice": v} for i, v in enumerate(dice)]}

    lines = paired_comparisons(
        [run("supervised", scratch), run("spark+supervised", spark), run("pcrl+supervised", pcrl)]
    )
    rows = {line.split(" | ")[1]: line for line in lines if line.startswith("| 4 |")}
    assert set(rows) == {"pcrl+supervised vs supervised", "spark+supervised vs supervised",
                         "spark+supervised vs pcrl+supervised"}  # fmt: skip
    assert rows["spark+supervised vs supervised"].endswith("| +3.00 | +3.00 | 5 of 5 | 0.062 |")
    assert rows["spark+supervised vs pcrl+supervised"].endswith("| +1.40 | +2.00 | 3 of 5 | 0.438 |")
    assert paired_comparisons([run("supervised", scratch)]) == []


def test_seeds_repeat_fine_tuning_and_pool_per_case():
    """--seeds 2: each (method, labels) is fine-tuned again with seed 1338 from the same pre-training; the report pairs
    runs of the same seed, and the per-case means over seeds (Dice averaged per case, then compared)."""
    runs = plan_runs(PROFILES["cpu"], ["supervised", "spark+supervised"], [4], 60, Path("/d"), Path("/o"), seeds=2)
    assert [r["name"] for r in runs] == [
        "spark_pretrain", "supervised-4", "supervised-4-seed2", "spark+supervised-4", "spark+supervised-4-seed2",
        "supervised-60",
    ]  # fmt: skip
    by_name = {r["name"]: r for r in runs}
    assert "seed" not in by_name["supervised-4"]["steps"][0]["overrides"]  # seed 1: the bundle's own (1337)
    assert by_name["spark+supervised-4-seed2"]["steps"][0]["overrides"]["seed"] == 1338
    assert by_name["spark+supervised-4-seed2"]["dir"] == "/o/runs/spark_supervised-4-seed2"
    assert by_name["spark+supervised-4-seed2"]["steps"][0]["overrides"]["pretrained_ckpt"] == (
        "/o/runs/spark_pretrain/models/model.pt"
    )
    with pytest.raises(ValueError, match="seeds"):
        plan_runs(PROFILES["cpu"], ["supervised"], [4], None, Path("/d"), Path("/o"), seeds=0)

    def run(method, seed, dice):
        cases = [{"case": f"c{i}", "dice": v} for i, v in enumerate(dice)]
        return {"method": method, "labels": 4, "seed": seed, "cases": cases}

    results = [
        run("supervised", 1, [0.70, 0.80, 0.60, 0.90]),
        run("supervised", 2, [0.74, 0.80, 0.64, 0.90]),
        run("spark+supervised", 1, [0.71, 0.82, 0.63, 0.94]),  # +1, +2, +3, +4 points
        run("spark+supervised", 2, [0.77, 0.76, 0.69, 0.89]),  # +3, -4, +5, -1 points
    ]
    pooled = {r["method"]: r for r in pool_seeds(results)}
    assert [c["dice"] for c in pooled["spark+supervised"]["cases"]] == pytest.approx([0.74, 0.79, 0.66, 0.915])
    assert pooled["spark+supervised"]["seed"] == "mean of 2"
    assert pooled["spark+supervised"]["summary"]["dice"]["mean"] == pytest.approx(0.77625)
    rows = {
        line.split(" | ")[1]: line.split(" | ")[2:] for line in paired_comparisons(results) if line.startswith("| 4")
    }
    # exact two-sided Wilcoxon with 4 distinct |differences| (16 sign patterns): seed 1 all positive -> 2/16; seed 2
    # W- = ranks of 4 and 1 = 3 + 1 = 4 -> 2 x 7/16; means over seeds +2, -1, +4, +1.5: W- = 1 -> 2 x 2/16
    assert rows["spark+supervised vs supervised"] == ["+2.50", "+2.50", "4 of 4", "0.125 |"]
    assert rows["spark+supervised vs supervised (seed 2)"] == ["+0.75", "+1.00", "2 of 4", "0.875 |"]
    mean, median, better, p = rows["spark+supervised vs supervised (mean of 2)"]
    assert float(mean) == pytest.approx(1.625, abs=0.006) and float(median) == pytest.approx(1.75)
    assert better == "3 of 4" and p == "0.250 |"


def test_parse_training_log(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        "\n".join(
            [
                "2026-01-01 10:00:00,000 - INFO - Epoch: 1/1, Iter: 1/3 -- train_loss: 0.9000 ",
                "2026-01-01 10:00:02,000 - INFO - Epoch: 1/1, Iter: 2/3 -- train_loss: 0.5000 ",
                "something else",
                "2026-01-01 10:00:05,500 - INFO - Epoch: 1/1, Iter: 3/3 -- loss: 0.2500 loss_sup: 0.1000 "
                "weight_rampup: 1.0 ",
            ]
        )
    )
    parsed = parse_training_log(log)
    assert parsed["loss_curve"] == [[1, 0.9], [2, 0.5], [3, 0.25]]  # "loss", not "loss_sup"
    assert parsed["seconds_per_iteration"] == pytest.approx(2.75)  # median of 2.0 and 3.5
    assert parse_training_log(tmp_path / "missing.log") == {"loss_curve": [], "seconds_per_iteration": None}


def test_smoke_profile_end_to_end_and_resume(tmp_path):
    out = tmp_path / "results"
    # two runs side by side (the pre-training first: pcrl+supervised starts from its weights)
    cmd = [sys.executable, "-m", "medssl", "benchmark", "--profile", "smoke", "--out", str(out), "--parallel", "2"]
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:]
    results = json.loads((out / "results.json").read_text())
    runs = {r["name"]: r for r in results["runs"]}
    assert set(runs) == {"pcrl_pretrain", "supervised-2", "pcrl+supervised-2", "cvrl-2", "simcvd-2", "supervised-6"}
    for name, r in runs.items():
        if name == "pcrl_pretrain":
            assert "summary" not in r and len(r["loss_curve"]) == 2
            continue
        assert [c["case"] for c in r["cases"]] == ["sample_006", "sample_007"]  # the split's test cases
        for m in ("dice", "jaccard", "hd95", "asd"):
            assert r["summary"][m]["mean"] == pytest.approx(np.nanmean([c[m] for c in r["cases"]]))
        assert 0 <= r["summary"]["dice"]["mean"] <= 1
        assert [i for i, _ in r["loss_curve"]] == [1, 2, 3, 4] and r["seconds_per_iteration"] > 0
        assert r["overrides"]["train"]["num_labeled"] == r["labels"] and r["seconds"]["train"] > 0
    for r in runs.values():  # a finished run keeps its final weights, not its resume checkpoints
        models = Path(r["dir"]) / "models"
        assert (models / "model.pt").is_file() and not list(models.glob("checkpoint_*.pt")), r["name"]
    pretrained = runs["pcrl+supervised-2"]["overrides"]["train"]["pretrained_ckpt"]
    assert pretrained.endswith("pcrl_pretrain/models/model.pt")
    assert results["environment"]["torch"] and results["environment"]["cpu_count"] >= 1
    table = (out / "results.md").read_text()
    for name, r in runs.items():
        if "summary" in r:
            row = f"| {r['method']} | {r['labels']} | {100 * r['summary']['dice']['mean']:.2f} ± "
            assert row in table, row
    for png in ("dice_vs_labels.png", "loss_curves.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(data[16:20], "big") > 300
    # a second run resumes: every run is done, nothing is trained again, the figures are the same
    start = time.time()
    again = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert again.returncode == 0 and time.time() - start < 60
    results2 = json.loads((out / "results.json").read_text())
    assert [r.get("summary") for r in results2["runs"]] == [r.get("summary") for r in results["runs"]]
    assert Path(out / "runs" / "supervised-2" / "train.log").read_text().count("\n$ ") == 1  # trained once


def test_speed_command_small(tmp_path):
    """`python -m medssl speed` on the sample set with tiny patches: every figure present and positive."""
    from medssl.lab.sample_data import sample_data

    data = sample_data(tmp_path / "data", num_cases=5, shape=(48, 48, 32), num_test=1)
    out = tmp_path / "speed"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medssl",
            "speed",
            "--dataset_dir",
            str(data),
            "--out",
            str(out),
            "--iterations",
            "2",
            "--patch_size",
            "32,32,32",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    result = json.loads((out / "speed.json").read_text())
    bundles = ["la_seg_finetune", "cvrl_semisup", "simcvd_distill", "pcrl_pretrain"]
    # each bundle in both modes, side by side
    assert [(r["bundle"], r["mode"]) for r in result["bundles"]] == [(b, m) for b in bundles for m in ("fp32", "amp")]
    amp_precision = "bf16" if cpu_bf16_support()[0] else "fp32"
    for r in result["bundles"]:
        assert r["patch_size"] == [32, 32, 32] and r["seconds_per_iteration"] > 0 and len(r["steps"]) == 2
        assert r["loader_volumes_per_second"] > 0 and r["peak_rss_mb"] > 0
        assert r["precision"] == ("fp32" if r["mode"] == "fp32" else amp_precision)
    for seg in result["bundles"][:2]:
        assert seg["batch_size"] == 4 and seg["ratio_to_bare"] == pytest.approx(
            seg["seconds_per_iteration"] / seg["bare_seconds_per_iteration"]
        )
    assert set(result["inference"]) == {"paper_stride", "overlap_0.5"}
    for per_mode in result["inference"].values():
        assert set(per_mode) == {"fp32", "amp"}
        assert all(v["seconds_per_volume"] > 0 and v["volumes"] == 1 for v in per_mode.values())
        # the same (untrained) weights in both modes: the label maps agree to bf16 rounding
        assert per_mode["amp"]["agreement_with_fp32"] > 0.95
    table = (out / "speed.md").read_text()
    assert "| la_seg_finetune | 32x32x32 | 4 | fp32 | fp32 |" in table and "| paper_stride | amp |" in table
    assert f"| la_seg_finetune | 32x32x32 | 4 | amp | {amp_precision} |" in table


def test_benchmark_amp_false_runs_every_step_in_fp32(tmp_path):
    """`--amp false --upper_bound false` (command-line strings, parsed strictly): one fp32 run, nothing else; trained
    with `--iterations 6 --steps train --overrides` (what a lent GPU does), then evaluated by the same command without
    `--steps` (what the machine the weights come back to does), training nothing again."""
    out = tmp_path / "fp32"
    run_dir = out / "runs" / "supervised-2"
    cmd = [sys.executable, "-m", "medssl", "benchmark", "--profile", "smoke", "--out", str(out)]
    cmd += ["--methods", "supervised", "--upper_bound", "false", "--iterations", "6"]
    cmd += ["--overrides", '{"sw_batch_size": 1}', "--amp", "false"]
    train_only = subprocess.run(
        cmd + ["--steps", "train"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900
    )
    assert train_only.returncode == 0, train_only.stdout[-4000:]
    assert (run_dir / "train.done.json").is_file() and (run_dir / "models" / "model.pt").is_file()
    assert not (run_dir / "evaluate.log").exists() and not (run_dir / "done.json").exists()
    assert "summary" not in json.loads((out / "results.json").read_text())["runs"][0]
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["supervised-2"]
    run = results["runs"][0]
    assert run["overrides"]["train"]["amp"] is False and run["overrides"]["evaluate"]["amp"] is False
    # the schedule fitted to 6 iterations: lr step 6 * 2500 // 6000 = 2, checkpoints at the profile's interval 2 (at most
    # half the run); the overrides in both steps
    train = run["overrides"]["train"]
    assert (train["max_iterations"], train["lr_step"], train["save_interval"]) == (6, 2, 2)
    assert train["sw_batch_size"] == 1 and run["overrides"]["evaluate"]["sw_batch_size"] == 1
    assert [i for i, _ in run["loss_curve"]] == [1, 2, 3, 4, 5, 6] and "dice_lcc" in run["summary"]
    assert run["seconds"]["train"] > 0 and run["seconds"]["evaluate"] > 0 and (run_dir / "done.json").is_file()
    assert (run_dir / "train.log").read_text().count("\n$ ") == 1  # trained once
    for step in ("train", "evaluate"):
        assert "Precision: fp32 on cpu (amp is off)." in (run_dir / f"{step}.log").read_text()
    bad = subprocess.run(cmd[:-1] + ["maybe"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert bad.returncode != 0 and "amp must be true or false, got 'maybe'" in bad.stdout
    bad = subprocess.run(
        cmd + ["--steps", "train,fit"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert bad.returncode != 0 and "steps: expected some of ['pretrain', 'train', 'evaluate'], got" in bad.stdout


def test_acdc_plan_patient_budgets_and_own_split(acdc_dir, tmp_path):
    """ACDC: the dataset's own lists (70 training patients; its 20 validation frames as the test set), budgets in
    patients (3 patients = their 6 ED/ES frames), the three coded cardiac labels, distances in voxels."""
    from medssl.data import write_dev_split
    from medssl.lab.benchmark_plan import ACDC_LABELS, patient_budgets

    split = write_dev_split(acdc_dir, tmp_path / "split", num_train=None)
    d = json.loads((split / "dataset.json").read_text())
    assert len(d["training"]) == 140 and len(d["test"]) == 20 and d["labels"]["2"] == "myocardium"
    assert d["training"][0]["patient"] == "patient099" and "its 'validation' list" in d["description"]
    frames = patient_budgets(d["training"], [3, 7, 70])
    assert frames == {3: 6, 7: 14, 70: 140}
    assert len({e["patient"] for e in d["training"][:6]}) == 3
    prof = PROFILES["acdc_cpu"]
    runs = plan_runs(prof, ["supervised", "cvrl"], [3, 7], 70, split, tmp_path, num_labeled=frames)
    train, evaluate = (s["overrides"] for s in runs[0]["steps"])
    assert runs[0]["name"] == "supervised-3" and train["num_labeled"] == 6 and train["labels"] == ACDC_LABELS
    assert train["patch_size"] == [128, 128, 16] and train["pad_small_volumes"] is True
    assert evaluate["labels"] == ACDC_LABELS and evaluate["distance_unit"] == "voxel"
    assert evaluate["spacing"] == [1.0, 1.0, 1.0] and evaluate["pad_small_volumes"] is True
    assert runs[-1]["name"] == "supervised-70" and runs[-1]["steps"][0]["overrides"]["num_labeled"] == 140
    assert [ACDC_LABELS[k]["code"][0] for k in "123"] == ["53085002", "74281007", "87878005"]
    scattered = [{"patient": p} for p in ("a", "b", "a")]
    with pytest.raises(ValueError, match="patient 'a' are not next to each other"):
        patient_budgets(scattered, [1])
    with pytest.raises(ValueError, match="a budget of 3 patients; the list has 2"):
        patient_budgets([{"patient": "a"}, {"patient": "b"}], [3])


def test_acdc_smoke_run_reports_per_class(acdc_dir, tmp_path):
    """A real ACDC subset (4 training patients, 2 validation frames) through the benchmark command at smoke size:
    1 labeled patient = its 2 frames, the dataset's own label names, a per-class table and plot."""
    source = json.loads((acdc_dir / "dataset.json").read_text())
    absolute = lambda e: {**e, "image": str(acdc_dir / e["image"]), "label": str(acdc_dir / e["label"])}  # noqa: E731
    subset = {
        "labels": source["labels"],
        "training": [absolute(e) for e in source["training"][:8]],
        "validation": [absolute(e) for e in source["validation"][:2]],
    }
    (tmp_path / "acdc").mkdir()
    (tmp_path / "acdc" / "dataset.json").write_text(json.dumps(subset))
    out = tmp_path / "results"
    overrides = {"patch_size": [64, 64, 16], "spacing": [1.0, 1.0, 1.0], "pad_small_volumes": True}
    proc = subprocess.run(
        [sys.executable, "-m", "medssl", "benchmark", "--profile", "smoke", "--dataset_dir", str(tmp_path / "acdc"),
         "--out", str(out), "--labels", "1", "--methods", "supervised", "--upper_bound", "false",
         "--overrides", json.dumps(overrides)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:]
    results = json.loads((out / "results.json").read_text())
    (run,) = results["runs"]
    assert run["name"] == "supervised-1" and run["overrides"]["train"]["num_labeled"] == 2
    expected = [Path(e["image"]).name[: -len(".nii.gz")] for e in subset["validation"]]
    assert [c["case"] for c in run["cases"]] == expected
    summary = run["summary"]
    for name in ("right_ventricle", "myocardium", "left_ventricle"):
        assert f"dice_{name}" in summary and f"hd95_{name}" in summary  # voxels: the ACDC tables' unit
    per_class = np.mean([summary[f"dice_{n}"]["mean"] for n in ("right_ventricle", "myocardium", "left_ventricle")])
    assert summary["dice"]["mean"] == pytest.approx(per_class, abs=2e-6)  # the mean over classes (CSV: 6 decimals)
    table = (out / "results.md").read_text()
    head = "| method | labeled | right ventricle Dice % | myocardium Dice % | left ventricle Dice % | mean Dice % |"
    assert head in table
    assert results["budget_unit"] == "patients"
    assert (out / "dice_per_class.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
