"""Copy a dataset folder with every image z-scored over its own volume (labels copied unchanged).

The experiment of ``benchmarks/results/cpu/README.md`` ("Intensity scale"): the LA release is normalised over each
whole scan before the crop around the atrium (UA-MT's preprocessing), so the crops' intensity scales differ up to
5x between cases, and the cases with the smallest scale are the ones every method fails on. Training and testing
on this copy shows what per-volume normalisation does, without changing the bundles.

    python benchmarks/zscore_split.py --src DEV_SPLIT --out DEV_SPLIT_ZSCORED
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fire
import nibabel as nib
import numpy as np

from medssl.data import atomic_path, load_datalist, write_json, write_nifti


def main(src: str, out: str) -> str:
    src_dir, out_dir = Path(src).resolve(), Path(out).resolve()
    if src_dir == out_dir:
        raise ValueError(f"--out must differ from --src ({src_dir}).")
    datalist = load_datalist(src_dir)  # checked, with absolute paths
    raw = json.loads((src_dir / "dataset.json").read_text())  # relative paths to keep
    for key, entries in raw.items():
        if not isinstance(entries, list):
            continue
        for entry, checked in zip(entries, datalist[key]):
            for field in ("image", "label"):
                if field not in entry:
                    continue
                dst = out_dir / entry[field]
                if field == "image":
                    img = nib.load(checked[field])
                    x = np.asarray(img.dataobj, dtype=np.float32)
                    std = float(x.std())
                    if not np.isfinite(std) or std == 0:
                        raise ValueError(f"{checked[field]}: constant or non-finite image (std {std}); cannot z-score.")
                    write_nifti((x - x.mean()) / std, img.affine, dst, dtype=np.float32)
                else:
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_path(dst) as tmp:
                        shutil.copyfile(checked[field], tmp)
    raw["description"] = str(raw.get("description", "")) + " Every image z-scored over its own volume."
    write_json(raw, out_dir / "dataset.json")  # last: the folder is a dataset only once every volume is written
    print(out_dir / "dataset.json")
    return str(out_dir)


if __name__ == "__main__":
    fire.Fire(main)
