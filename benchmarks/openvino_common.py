"""Shared pieces of the OpenVINO benchmarks (``openvino_speed.py``, ``openvino_accuracy.py``): the CPU, the bundle and
its artefacts, and one network per runtime.

Runtimes (the network the bundle's sliding-window inference calls):

- ``torch-fp32``: the eager VNet in fp32, channels-last (``--amp false`` on a CPU);
- ``torch-bf16``: the same under bf16 autocast (the bundle's default on a CPU with native bf16, like this one);
- ``openvino``: the fp32 IR, fp32 arithmetic (``OpenVINONetwork(precision="f32")``);
- ``openvino-bf16``: the fp32 IR run in bf16 (OpenVINO's own default on a CPU with native bf16);
- ``openvino-int8``: the int8 IR rebuilt from the calibration record, fp32 wherever it is not int8.
"""

from __future__ import annotations

import json
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

RUNTIMES = ("torch-fp32", "torch-bf16", "openvino", "openvino-bf16", "openvino-int8")
CPU_FLAGS = ("avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_info() -> Dict[str, Any]:
    """``lscpu``'s model name and which of :data:`CPU_FLAGS` the CPU has."""
    name = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"model_name": name, "flags": {f: f in flags for f in CPU_FLAGS}, "cores": torch.get_num_threads()}


def cpu_slug(info: Optional[Dict[str, Any]] = None) -> str:
    """``amd_epyc``-style folder name of the CPU model."""
    name = (info or cpu_info())["model_name"].lower()
    return "_".join("".join(c if c.isalnum() else " " for c in name).split()) or "cpu"


def bundle_root(path: Optional[str]) -> Path:
    """``path``, or the released la_seg_finetune pulled from the checkout's index into a temporary cache."""
    if path:
        return Path(path).resolve()
    from medssl.bundle import default_index
    from medssl.clinic.release import pull

    cache = Path(tempfile.gettempdir()) / "medssl-openvino-bench"
    return pull("la_seg_finetune", bundle_dir=str(cache), index=default_index(), torchscript=False)


def prepare_artefacts(root: Path, work: Path, record: Optional[str]) -> Dict[str, str]:
    """The fp32 IR of the bundle's weights and, with ``record``, the int8 IR rebuilt from it, under ``work``."""
    from medssl import openvino as mov
    from medssl import openvino_int8
    from medssl.export import eager_network

    work.mkdir(parents=True, exist_ok=True)
    sha = mov.file_sha256(root / "models" / "model.pt")
    fp32 = mov.export_fp32(eager_network(root), work / "fp32.xml", weights_sha256=sha)
    out = {"fp32": str(fp32)}
    if record:
        out["int8"] = str(openvino_int8.quantize_from_record(fp32, record, work / "int8.xml", weights_sha256=sha))
    return out


def runtime_network(runtime: str, root: Path, artefacts: Dict[str, str], max_batch: int = 1) -> torch.nn.Module:
    """The network ``runtime`` runs (see the module docstring), taking and returning fp32 tensors."""
    from medssl.export import eager_network
    from medssl.precision import MixedPrecision, prepare_network

    if runtime in ("torch-fp32", "torch-bf16"):
        net = prepare_network(eager_network(root), "cpu", channels_last=True)
        return MixedPrecision(net, "bf16" if runtime == "torch-bf16" else "fp32", channels_last=True)
    from medssl.openvino import OpenVINONetwork

    if runtime in ("openvino", "openvino-bf16"):
        return OpenVINONetwork(artefacts["fp32"], precision="bf16" if runtime.endswith("bf16") else "f32",
                               max_batch=max_batch)  # fmt: skip
    if runtime == "openvino-int8":
        return OpenVINONetwork(artefacts["int8"], precision="f32", max_batch=max_batch)
    raise ValueError(f"runtime: expected one of {RUNTIMES}; got {runtime!r}.")


def bundle_parts(root: Path) -> Dict[str, Any]:
    """The bundle's preprocessing, sliding-window inferer and postprocessing up to the label map (inversion to the
    input grid and argmax; no largest component, no writing), as ``inference.json`` builds them."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser["bundle_root"] = str(root)
    parser["largest_component"] = False
    post = parser.get_parsed_content("postprocessing")
    kept = [t for t in post.transforms if type(t).__name__ in ("Invertd", "AsDiscreted")]
    return {
        "preprocessing": parser.get_parsed_content("preprocessing"),
        "inferer": parser.get_parsed_content("inferer"),
        "postprocessing": Compose(kept),
        "patch_size": [int(s) for s in parser.get_parsed_content("patch_size")],
        "sw_batch_size": int(parser.get_parsed_content("sw_batch_size")),
        "sw_overlap": float(parser.get_parsed_content("sw_overlap")),
    }


def case_list(dataset_dir: Path, spec: str) -> Sequence[Dict[str, Any]]:
    """Cases ``"61-80"`` or ``"3,8,13"`` (1-based positions of the ``training`` list) with image and label paths."""
    entries = json.loads((dataset_dir / "dataset.json").read_text())["training"]
    positions = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        positions += list(range(int(a), int(b or a) + 1))
    return [
        {
            "position": p,
            "id": Path(entries[p - 1]["image"]).name.split(".nii")[0],
            "image": str(dataset_dir / entries[p - 1]["image"]),
            "label": str(dataset_dir / entries[p - 1]["label"]),
        }
        for p in positions
    ]
