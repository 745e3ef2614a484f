"""Train, evaluate and package the ACDC release (``acdc_seg_finetune``): la_seg_finetune's configs with ACDC's three
cardiac structures (SNOMED CT coded), trained on all 70 training patients (140 ED/ES frames, all labeled) of the
SSL4MIS split and scored on its 20 validation frames.

    python benchmarks/acdc_release.py --dataset_dir ../shared/data/acdc --out benchmarks/results/acdc_release_cpu \\
        --package true

Steps: (1) ``python -m medssl benchmark``'s upper-bound run of the profile (``acdc_cpu`` by default: patch
128x128x16, stacks of fewer slices padded, 1000 iterations) under ``OUT/runs/supervised-70``, evaluated on the
validation frames (``OUT/results.md``); resumable, a finished step is not run again. (2) The release folder
``OUT/release/acdc_seg_finetune``: the trained run's configs (its task written by training) with ACDC's keys as the
defaults of train / evaluate / inference too, metadata naming the data, the recipe and the validation figures, a
README and the data's terms; the LA-only records (OpenVINO int8 calibration, runtime accuracy) are left out, they
hold for other weights. (3) With ``--package true``: ``releases/acdc_seg_finetune_vVERSION.zip`` (float16 weights,
TorchScript left to pull time) recorded in ``bundle_index.json``, as the committed releases were built.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAME = "acdc_seg_finetune"
VERSION = "0.1.0"
# la_seg_finetune's records that hold for its own released weights only
LA_ONLY = ("openvino_int8.json", "runtime_accuracy.json")
# the task keys a release's configs carry as their defaults (those that each config has)
TASK_KEYS = ("labels", "spacing", "patch_size", "pad_small_volumes", "intensity", "modality")

DATA_LICENSE = """Third Party Licenses
-----------------------------------------------------------------------

Bundle acdc_seg_finetune: the data behind its weights and figures, the data's
terms as far as they are known, and the papers to cite.

The bundle's code and configs are under the Apache License 2.0 (LICENSE).
That licence grants no rights in the data below. No data ship with the bundle.

What this bundle used:
- Released weights: the 140 ED/ES frames of the 70 training patients of the
  SSL4MIS split of ACDC (i), all labeled; its 10 validation patients (20
  frames) for the figures in docs/README.md; its 20 test patients not at all.

Whoever trains the bundle on other data takes on that data's terms.

/*********************************************************************/
i. Automated Cardiac Diagnosis Challenge (ACDC), MICCAI 2017
   https://www.creatis.insa-lyon.fr/Challenge/acdc/
/*********************************************************************/

The data: cine short-axis MRI of 150 patients (100 training, 50 testing) from
the University Hospital of Dijon, five groups (normal, myocardial infarction,
dilated and hypertrophic cardiomyopathy, abnormal right ventricle), with
expert labels of the right ventricle, myocardium and left ventricle at end
diastole and end systole. As preprocessed and split by the SSL4MIS collection
(HiLab-git/SSL4MIS): min-max scaled per volume, no voxel spacing kept.

Terms: for research use (the challenge's terms); cite the paper below.

Cite: O. Bernard et al., "Deep Learning Techniques for Automatic MRI Cardiac
Multi-Structures Segmentation and Diagnosis: Is the Problem Solved?", IEEE
Transactions on Medical Imaging 37(11), 2018.
"""


def _mean_row(metrics_csv: Path) -> dict:
    with open(metrics_csv, newline="") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    return {"mean": rows["mean"], "std": rows["std"], "cases": [k for k in rows if k not in ("mean", "std", "n_nan")]}


def _figures(run_dir: Path, labels: dict) -> dict:
    table = _mean_row(run_dir / "eval" / "metrics.csv")
    mean, std = table["mean"], table["std"]
    names = {k: (v if isinstance(v, str) else v["name"]) for k, v in labels.items() if k != "0"}
    slug = {k: n.replace(" ", "_") for k, n in names.items()}
    per_class = {
        names[k]: {
            "dice": round(float(mean[f"dice_{s}"]), 4),
            "hd95_voxels": round(float(mean[f"hd95_{s}"]), 2),
        }
        for k, s in slug.items()
    }
    return {
        "mean_dice": round(float(mean["dice"]), 4),
        "std_dice": round(float(std["dice"]), 4),
        "mean_jaccard": round(float(mean["jaccard"]), 4),
        "mean_hd95_voxels": round(float(mean["hd95"]), 2),
        "mean_asd_voxels": round(float(mean["asd"]), 2),
        "per_class": per_class,
        "cases": len(table["cases"]),
    }


def _set_task_keys(config: dict, task: dict) -> dict:
    for key, value in task.items():
        if key in config:
            config[key] = value
    return config


def _warm_start(recipe: dict) -> str:
    first = recipe.get("warm_start")
    if not first:
        return ""
    return (
        f", starting from the weights of a first stage of {first['max_iterations']} iterations (the same recipe, "
        f"x0.1 every {first['lr_step']}, {first['train_seconds'] / 60:.0f} min on {first['cpu']}; mean Dice "
        f"{100 * first['validation_mean_dice']:.2f} % on the validation frames after it): "
        f"{first['max_iterations'] + recipe['max_iterations']} iterations in all, the learning rate restarted once"
    )


def _readme(meta: dict, recipe: dict, figures: dict, seconds: float, cpu: str) -> str:
    per_class = "\n".join(
        f"| {name} | {100 * v['dice']:.2f} | {v['hd95_voxels']:.2f} |" for name, v in figures["per_class"].items()
    )
    return f"""# Model Overview
A VNet segmenting the right ventricle, the myocardium and the left ventricle in cine short-axis cardiac MRI (ACDC),
medssl's la_seg_finetune recipe with ACDC's label set: trained supervised on every frame of the 70 training patients
of the SSL4MIS split. The labels carry their SNOMED CT codes (right ventricle 53085002, myocardium 74281007, left
ventricle 87878005), so `python -m medssl segment`, the DICOM node and the MONAI Label app name and code the three
structures in statistics.json and the DICOM SEG.

## Data
ACDC (Bernard et al., IEEE TMI 2018) as SSL4MIS preprocessed it: end-diastolic and end-systolic frames, stacks of 6-18
slices, in-plane 154-256 voxels, intensities min-max scaled per volume, no voxel spacing kept (identity affine).
Training: the 140 frames of the 70 training patients, all labeled. Figures: the 20 frames of the 10 validation
patients. SSL4MIS's 20 test patients were not used. See docs/data_license.txt.

### Preprocessing
RAS, resampled to `spacing` {recipe['spacing']} (the data's voxel units: the public release has no spacing, so one
voxel is one unit), z-score over the volume, stacks of fewer than {recipe['patch_size'][2]} slices padded so the VNet
sees whole stacks. Inference inverts it: the label map comes back in the input's shape and affine.

## Training configuration
Patch {'x'.join(map(str, recipe['patch_size']))}, batch {recipe['batch_size']}, {recipe['max_iterations']} iterations
(SGD lr 0.01, x0.1 every {recipe['lr_step']}), Dice + cross-entropy, on {cpu} in {seconds / 60:.0f} min
(`benchmarks/acdc_release.py`, profile {recipe['profile']}){_warm_start(recipe)}.

## Performance
The released weights on the 20 validation frames (SSL4MIS's validation patients; not used in training), in the frames'
own grid, largest component per structure off (the papers' protocol), distances in voxels:

| structure | Dice (%) | 95HD (voxels) |
|---|---|---|
{per_class}
| mean | {100 * figures['mean_dice']:.2f} ± {100 * figures['std_dice']:.2f} | {figures['mean_hd95_voxels']:.2f} |

## MONAI Bundle Commands
```bash
python -m medssl pull {NAME} --bundle_dir bundles_pulled
python -m medssl segment patient101_frame01.nii.gz --bundle {NAME}
python -m monai.bundle run --config_file bundles_pulled/{NAME}_v{meta['version']}/configs/inference.json \\
    --bundle_root bundles_pulled/{NAME}_v{meta['version']} --dataset_dir scans/
```

## Limitations
Trained on one centre's cine MRI (Dijon) in ACDC's voxel grid: a scan whose header gives its real spacing (about 1.4-1.7
mm in-plane, 5-10 mm slices) is resampled to 1 unit per voxel, a grid the model did not see in training; give it volumes
in their native voxel grid (identity affine, as ACDC ships them) or fine-tune on your own. Not for other sequences,
orientations than short axis, or other anatomy. {meta['intended_use']}

# References
- Bernard et al., Deep Learning Techniques for Automatic MRI Cardiac Multi-Structures Segmentation and Diagnosis: Is
  the Problem Solved?, IEEE TMI 37(11), 2018
- Milletari et al., V-Net: Fully Convolutional Neural Networks for Volumetric Medical Image Segmentation, 3DV 2016
- Luo et al., SSL4MIS (github.com/HiLab-git/SSL4MIS), the split

# License
Code and configs: Apache License 2.0 (LICENSE). The data's terms: docs/data_license.txt.
"""


def build_release(
    out: Path, run_dir: Path, profile_name: str, iterations: int | None = None, stage1: dict | None = None
) -> Path:
    """The release folder ``out/release/acdc_seg_finetune`` from a trained and evaluated run (see the module doc);
    ``stage1`` (``_stage1``): the run was warm-started from that stage's weights, its recipe goes in first."""
    from medssl.lab.benchmark_plan import PROFILES, scaled_lr_step

    profile = PROFILES[profile_name]
    if iterations is not None:
        profile = replace(profile, train={**profile.train, "max_iterations": iterations, "lr_step": scaled_lr_step(iterations)})
    configs = run_dir / "configs"
    if not (configs / "inference.json").is_file() or not (run_dir / "models" / "model.pt").is_file():
        raise FileNotFoundError(f"{run_dir}: expected a trained run (configs/inference.json, models/model.pt).")
    inference = json.loads((configs / "inference.json").read_text())
    task = {k: inference[k] for k in TASK_KEYS if k in inference}
    task.setdefault("pad_small_volumes", bool(profile.train.get("pad_small_volumes", False)))
    train = json.loads((configs / "train.json").read_text())
    recipe = {
        "profile": profile_name,
        **{k: profile.train[k] for k in ("patch_size", "spacing", "max_iterations", "lr_step") if k in profile.train},
        "batch_size": profile.train.get("batch_size", train["batch_size"]),
    }
    if stage1:
        recipe = {**recipe, "warm_start": stage1["recipe"]}
    figures = _figures(run_dir, task["labels"])
    # the training labels' volumes, for segment's plausibility check (medssl.clinic.quality)
    from medssl.clinic.quality import training_label_volumes
    from medssl.data import load_datalist

    data_dir = out / "data"  # the split the benchmark wrote (its training list: the 140 frames)
    training = load_datalist(data_dir)["training"]
    names = {int(k): (v if isinstance(v, str) else v["name"]) for k, v in task["labels"].items() if k != "0"}
    volumes = training_label_volumes([data_dir / e["label"] for e in training], names)
    seconds = json.loads((run_dir / "train.done.json").read_text())["seconds"]
    target = out / "release" / NAME
    tmp = target.with_name(f".{NAME}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(configs, tmp / "configs", ignore=shutil.ignore_patterns(*LA_ONLY))
    for name in ("train.json", "evaluate.json", "multi_gpu_train.json"):
        path = tmp / "configs" / name
        if path.is_file():
            path.write_text(json.dumps(_set_task_keys(json.loads(path.read_text()), task), indent=4) + "\n")
    la = REPO / "bundles" / "la_seg_finetune"
    shutil.copy(la / "LICENSE", tmp / "LICENSE")
    meta_path = tmp / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("openvino_int8_calibration", None)
    cpu = _cpu_name()
    meta.update(
        {
            "version": VERSION,
            "changelog": {
                VERSION: "first release: la_seg_finetune's VNet recipe with ACDC's three cardiac structures (SNOMED CT "
                "coded), trained on all 70 training patients of the SSL4MIS split (140 frames), scored on its 20 "
                "validation frames"
            },
            "name": "ACDC cardiac segmentation (VNet)",
            "task": "Right ventricle, myocardium and left ventricle segmentation in cine short-axis cardiac MRI",
            "description": "Supervised VNet (medssl's la_seg_finetune recipe) for the three ACDC structures in cine "
            "short-axis MRI at end diastole and end systole. Preprocessing (the same for training, evaluation and "
            "inference): RAS, resampled to `spacing` (ACDC's voxel units), z-score over the volume, stacks of fewer "
            "slices than the patch padded; the label map comes back in the input's own grid.",
            "data_source": "ACDC (Bernard et al., IEEE TMI 2018), the SSL4MIS preprocessing and split: the released "
            "weights saw the 140 ED/ES frames of its 70 training patients, all labeled; its 20 test patients were "
            "not used.",
            "data_type": "nibabel",
            "image_classes": "single channel cine MR intensity (ACDC: min-max scaled per volume), short-axis stacks "
            "of 6-18 slices in the data's voxel grid; the preprocessing makes it RAS and z-scored",
            "label_classes": "0 background, 1 right ventricle, 2 myocardium, 3 left ventricle",
            "pred_classes": "4 channels: 0 background, 1 right ventricle, 2 myocardium, 3 left ventricle",
            "eval_metrics": {
                **{k: v for k, v in figures.items() if k != "cases"},
                "protocol": f"the released weights on the {figures['cases']} validation frames of SSL4MIS's 10 "
                "validation patients (not used in training), in their own grid, no post-processing, distances in "
                "voxels (the data have no spacing)",
            },
            "intended_use": "Research only. Not for clinical diagnosis or treatment. Trained on ACDC's cine MRI "
            "(one centre, short axis, voxel units); other sites, sequences or grids are outside what it was "
            "measured on.",
            "references": [
                "Bernard et al., Deep Learning Techniques for Automatic MRI Cardiac Multi-Structures Segmentation and "
                "Diagnosis: Is the Problem Solved?, IEEE TMI 37(11), 2018",
                "Milletari et al., V-Net: Fully Convolutional Neural Networks for Volumetric Medical Image "
                "Segmentation, 3DV 2016",
            ],
            "release_recipe": {**recipe, "train_seconds": round(seconds, 1), "cpu": cpu},
            "training_label_volumes_ml": volumes,
        }
    )
    meta_path.write_text(json.dumps(meta, indent=4) + "\n")
    (tmp / "docs").mkdir()
    (tmp / "docs" / "README.md").write_text(_readme(meta, recipe, figures, seconds, cpu))
    (tmp / "docs" / "data_license.txt").write_text(DATA_LICENSE)
    (tmp / "large_files.yml").write_text("large_files: []\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def _stage1(first_out: Path) -> dict:
    """The first stage of a warm-started release: its weights and recipe (from its release folder's metadata)."""
    runs = sorted((first_out / "runs").glob("supervised-*"))
    meta = first_out / "release" / NAME / "configs" / "metadata.json"
    if len(runs) != 1 or not (runs[0] / "models" / "model.pt").is_file() or not meta.is_file():
        raise SystemExit(
            f"--warm_start {first_out}: expected a finished run of this script (runs/supervised-N/models/model.pt "
            f"and release/{NAME}/configs/metadata.json)."
        )
    meta = json.loads(meta.read_text())
    recipe = {**meta["release_recipe"], "validation_mean_dice": meta["eval_metrics"]["mean_dice"]}
    return {"weights": str(runs[0] / "models" / "model.pt"), "recipe": recipe}


def _cpu_name() -> str:
    import platform

    try:
        name = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        name = platform.processor() or "a CPU"
    return f"{os.cpu_count()} cores of {name}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", required=True, help="the ACDC folder (dataset.json with its SSL4MIS lists)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile", default="acdc_cpu", choices=("acdc_cpu", "acdc_gpu"))
    ap.add_argument("--iterations", type=int, default=None, help="instead of the profile's (a smoke run)")
    ap.add_argument("--overrides", default=None, help="JSON bundle overrides (a smoke run: a small patch)")
    ap.add_argument(
        "--warm_start", default=None,
        help="the OUT of a finished run of this script: train from its weights (a second stage, the learning rate "
        "restarted), recorded in the release's recipe",
    )  # fmt: skip
    ap.add_argument("--package", default="false", choices=("true", "false"))
    ap.add_argument("--releases", default=str(REPO / "releases"))
    ap.add_argument("--index", default=str(REPO / "bundle_index.json"))
    args = ap.parse_args(argv)
    from medssl.lab.benchmark import benchmark

    out = Path(args.out).resolve()
    start = time.perf_counter()
    overrides = json.loads(args.overrides) if args.overrides else {}
    stage1 = _stage1(Path(args.warm_start).resolve()) if args.warm_start else None
    if stage1:
        overrides["pretrained_ckpt"] = stage1["weights"]
    benchmark(
        dataset_dir=args.dataset_dir, profile=args.profile, out=str(out), methods=(), upper_bound=True,
        iterations=args.iterations, overrides=overrides or None,
    )  # fmt: skip
    runs = sorted((out / "runs").glob("supervised-*"))
    if len(runs) != 1:
        raise SystemExit(f"{out / 'runs'}: expected one supervised-N run, found {[r.name for r in runs]}.")
    folder = build_release(out, runs[0], args.profile, iterations=args.iterations, stage1=stage1)
    print(f"release folder {folder} ({time.perf_counter() - start:.0f} s)")
    if args.package == "true":
        from medssl.clinic.release import package

        zip_path = package(
            NAME, out=args.releases, weights=str(runs[0] / "models" / "model.pt"), index=args.index, base_url="",
            bundles_dir=str(folder.parent), half=True, torchscript=False,
        )  # fmt: skip
        print(zip_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
