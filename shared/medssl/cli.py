"""Command line of medssl: ``python -m medssl <command> [--flag value ...]`` (``--help`` on any command).

Commands:
    demo         the main job: sample data -> short la_seg_finetune training -> evaluation -> table + PNG
    dicom_node   DICOM node: receives MR series by C-STORE, segments each, C-STOREs the DICOM SEG to --destination
    prepare_la   convert a public LA release (UA-MT h5 or challenge nrrd layout) to NIfTI + dataset.json
    sample_data  write the synthetic atrium-like sample set
    dev_split    write the development split of the LA data (cases 1-60 train, 61-80 test), optionally downsampled
    benchmark    every method at 8 / 16 labels vs the supervised baseline: results.json, results.md, plots
    package      build a release zip of a bundle (with weights and TorchScript) and record it in bundle_index.json
    pull         download a released bundle by name, verify its checksum, extract it safely
    segment      segment NIfTI scans with a released bundle: <name>_seg.nii.gz in each scan's geometry, volume in mL
    speed        seconds per iteration of every bundle vs the bare network, loader throughput, inference time
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import fire
from medssl.data import DataError, as_bool, data_error_message

__all__ = ["main", "ScansFailed"]


class ScansFailed(Exception):
    """Some scans of a batch failed (each already reported); the command exits with status 1."""


def prepare_la(src: str, out: str, overwrite: bool = False, seed: int = 0) -> str:
    """Convert the public LA release at ``src`` into NIfTI + dataset.json under ``out`` (safe to re-run)."""
    from medssl.lab.prepare_la import prepare_la as _prepare_la

    return str(_prepare_la(src, out, overwrite=overwrite, seed=seed))


def sample_data(out: str, num_cases: int = 6, shape: str = "96,96,64", seed: int = 0, num_test: int = 2) -> str:
    """Write the deterministic synthetic atrium-like sample set (NIfTI + dataset.json) under ``out``."""
    from medssl.lab.sample_data import sample_data as _sample_data

    return str(_sample_data(out, num_cases=num_cases, shape=shape, seed=seed, num_test=num_test))


def dev_split(dataset_dir: str, out: str, num_train: int = 60, downsample: int = 1) -> str:
    """Write the dev split (training = first ``num_train`` cases, test = the rest) of ``dataset_dir`` to ``out``;
    ``--downsample 2`` also writes half-resolution copies for CPU protocols."""
    from medssl.data import write_dev_split

    return str(write_dev_split(dataset_dir, out, num_train=num_train, downsample=downsample))


def demo(
    out: str = "demo_output",
    iterations: int = 100,
    seed: int = 0,
    bundles_dir: str = None,
    scan: str = None,
    release: bool = True,
) -> None:
    """Sample data, a short la_seg_finetune training, evaluation, inference; prints metrics, writes demo.png; then
    the released la_seg_finetune segments a real LA scan (or --scan) and writes release/release.png."""
    from medssl.lab.demo import demo as _demo

    _demo(
        out=out,
        iterations=iterations,
        seed=seed,
        bundles_dir=bundles_dir,
        scan=scan,
        release=as_bool(release, "release"),
    )


def _json_object(text: str, name: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{name}: expected a JSON object, e.g. '{{\"patch_size\": [32, 32, 32]}}'; got {text!r} ({e})."
        )
    if not isinstance(value, dict):
        raise ValueError(f"{name}: expected a JSON object of bundle config keys, got {text!r}.")
    return value


def benchmark(
    dataset_dir: str = None,
    profile: str = "smoke",
    out: str = "results",
    labels=None,
    methods: str = "supervised,pcrl+supervised,cvrl,simcvd",
    upper_bound: bool = True,
    bundles_dir: str = None,
    amp: bool = True,
    seeds: int = 1,
    iterations: int = None,
    parallel: int = 1,
    steps: str = "pretrain,train,evaluate",
    overrides=None,
    num_train: int = None,
) -> str:
    """Label-efficiency benchmark: each method at each label count vs the supervised baseline (see
    medssl.lab.benchmark); writes results.json, results.md and PNG plots under ``out``; re-run to resume.
    ``--iterations N`` shortens every training (lr step scaled), ``--parallel K`` trains K runs side by side,
    ``--steps pretrain,train`` stops before evaluating (evaluate later, elsewhere, with the default),
    ``--overrides '{"patch_size": [32, 32, 32]}'`` adds bundle overrides to every training and evaluation,
    ``--num_train N`` tests on a dev split (the first N training cases train) instead of the profile's split (LA:
    60; ACDC: its own lists; ``--profile acdc_cpu --labels 3,7`` counts patients)."""
    from medssl.lab.benchmark import benchmark as _benchmark

    labels = [int(x) for x in str(labels).strip("()[]").split(",") if x.strip()] if labels is not None else None
    methods = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    _benchmark(
        dataset_dir=dataset_dir,
        profile=profile,
        out=out,
        labels=labels,
        methods=methods,
        upper_bound=as_bool(upper_bound, "upper_bound"),
        bundles_dir=bundles_dir,
        amp=as_bool(amp, "amp"),
        seeds=int(seeds),
        iterations=None if iterations is None else int(iterations),
        parallel=int(parallel),
        steps=[k.strip() for k in (steps.split(",") if isinstance(steps, str) else steps) if k.strip()],
        overrides=_json_object(overrides, "overrides") if isinstance(overrides, str) else overrides,
        num_train=None if num_train is None else int(num_train),
    )
    return str(Path(out) / "results.md")


def package(
    bundle: str,
    out: str = "dist",
    weights: str = None,
    index: str = None,
    base_url: str = "https://github.com/medssl/medssl/releases/download",
    half: bool = False,
    torchscript: bool = True,
    record_in_bundle: bool = False,
) -> str:
    """Build dist/NAME_vVERSION.zip (deterministic bytes; with --weights: models/model.pt and model.ts) and record
    it in bundle_index.json (sha1 + sha256 + source URL; --base_url "" records a path relative to the index);
    --half true stores the weights in float16, --torchscript false leaves model.ts to be exported at pull time;
    --record_in_bundle true writes the bundle's large_files.yml (weights' URLs and sha256) into its source folder."""
    from medssl.clinic.release import package as _package

    return str(
        _package(
            bundle,
            out=out,
            weights=weights,
            index=index,
            base_url=base_url,
            half=as_bool(half, "half"),
            torchscript=as_bool(torchscript, "torchscript"),
            record_in_bundle=as_bool(record_in_bundle, "record_in_bundle"),
        )
    )


def pull(
    name: str, bundle_dir: str = "bundles_pulled", version: str = None, index: str = None, torchscript: bool = True
) -> str:
    """Download NAME from the index (path or URL; default the checkout's bundle_index.json, or $MEDSSL_INDEX),
    verify its sha256, extract safely to bundle_dir/NAME_vVERSION, and make models/model.ts and models/model.pt2 from
    models/model.pt (recorded in models/exports.json; --torchscript false skips them)."""
    from medssl.bundle import default_index
    from medssl.clinic.release import pull as _pull

    return str(
        _pull(
            name,
            bundle_dir=bundle_dir,
            version=version,
            index=index or default_index(),
            torchscript=as_bool(torchscript, "torchscript"),
        )
    )


def segment(
    *scans: str,
    bundle: str = "la_seg_finetune",
    out: str = "segmentations",
    index: str = None,
    bundle_dir: str = None,
    device: str = None,
    largest_component: bool = True,
    output_type: str = None,
    series: str = None,
    preview: bool = False,
    fail_fast: bool = False,
    runtime: str = None,
    model_format: str = "pt",
) -> None:
    """Segment scans: NIfTI files or folders of them, DICOM series folders, study folders or .zip files (--series UID
    picks a series) with a released bundle (pulled and verified if needed; or a bundle folder with weights). Writes
    OUT/<name>_seg.nii.gz in each scan's own geometry, OUT/<name>_seg.dcm (DICOM SEG; --output_type
    nifti|dicom_seg|both, default both for DICOM), <name>_statistics.json, --preview true: <name>_preview.png; prints
    the volume in mL. A scan that fails is reported and skipped (exit status 1); --fail_fast true stops at it.
    --runtime torch|openvino|openvino-int8 picks the inference engine, --model_format pt|ts|pt2 what PyTorch runs (the
    eager network, models/model.ts or models/model.pt2; exports are made on first use and rebuilt when stale);
    default --runtime auto ($MEDSSL_RUNTIME): the fastest on this CPU that keeps the release's label maps (timed once
    per machine, cached in $MEDSSL_HOME/runtime_choice.json; torch for bundles without an accuracy record)."""
    from medssl.clinic.segment import print_table
    from medssl.clinic.segment import segment as _segment

    results = _segment(
        list(scans),
        bundle=bundle,
        out=out,
        index=index,
        bundle_dir=bundle_dir,
        device=device,
        largest_component=as_bool(largest_component, "largest_component"),
        output_type=output_type,
        series=None if series is None else str(series),
        preview=as_bool(preview, "preview"),
        fail_fast=as_bool(fail_fast, "fail_fast"),
        announce=print,
        runtime=None if runtime is None else str(runtime),
        model_format=str(model_format),
    )
    print_table(results)
    failed = sum(r["status"] != "ok" for r in results)
    if failed:
        raise ScansFailed(f"{failed} of {len(results)} scans failed")


def dicom_node(
    workdir: str = "dicom_node",
    ae_title: str = "MEDSSL",
    port: int = 11112,
    destination: str = None,
    host: str = "127.0.0.1",
    quiet_seconds: float = 10.0,
    max_queue: int = 16,
    send_retries: int = 3,
    bundle: str = "la_seg_finetune",
    index: str = None,
    bundle_dir: str = None,
    device: str = None,
    largest_component: bool = True,
    runtime: str = None,
    allow: str = None,
    allow_file: str = None,
    keep_days: float = None,
    max_done_gb: float = None,
    tls_cert: str = None,
    tls_key: str = None,
    tls_ca: str = None,
    tls_check_hostname: bool = True,
) -> None:
    """Run a DICOM node (Storage SCP, C-ECHO) until Ctrl-C: each complete MR series received (association released,
    or --quiet_seconds without a new instance) is segmented and its DICOM SEG C-STOREd to --destination AET@HOST:PORT;
    WORKDIR/incoming, done, failed keep every instance (see medssl.clinic.dicom_node). --runtime as for segment (default
    auto). --allow AE@HOST,... / --allow_file FILE: the callers let in (HOST an address, a network a.b.c.d/n, a name
    or *; AE a title or *); others are rejected at A-ASSOCIATE; default the destination's AE@host plus loopback.
    --keep_days N / --max_done_gb X: processed series leave done/ oldest first, never one whose SEG was not yet sent.
    --tls_cert / --tls_key (PEM) [--tls_ca: mutual TLS]: DICOM TLS for the SCP and the SEG sends.
    """
    from medssl.clinic.dicom_node import dicom_node as _dicom_node

    _dicom_node(
        workdir=workdir,
        ae_title=ae_title,
        port=port,
        destination=destination,
        host=host,
        quiet_seconds=quiet_seconds,
        max_queue=max_queue,
        send_retries=send_retries,
        bundle=bundle,
        index=index,
        bundle_dir=bundle_dir,
        device=device,
        largest_component=largest_component,
        runtime=None if runtime is None else str(runtime),
        allow=allow,
        allow_file=allow_file,
        keep_days=keep_days,
        max_done_gb=max_done_gb,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
        tls_check_hostname=tls_check_hostname,
    )


def speed(
    dataset_dir: str,
    out: str = "speed",
    iterations: int = 3,
    warmup: int = 1,
    patch_size=None,
    weights: str = None,
    num_volumes: int = 1,
    modes: str = "fp32,amp",
    repeats: int = 1,
    bundles: str = "la_seg_finetune,cvrl_semisup,simcvd_distill,pcrl_pretrain",
    runtimes: str = None,
    bundle: str = "la_seg_finetune",
    index: str = None,
) -> None:
    """Seconds per training iteration of each bundle in each precision mode (fp32, amp; also fp32_contiguous) side
    by side, vs the bare VNet, loader throughput, sliding-window inference seconds per volume (paper stride vs
    overlap 0.5) and the modes' label agreement, peak memory; writes speed.json and speed.md under ``out``.
    --runtimes torch,torch-fp32,ts,pt2,openvino,openvino-int8 instead compares the inference runtimes of --bundle (a
    released name, pulled, or a bundle folder) on the first --num_volumes native scans of the dataset's test list,
    each alone in its own process: seconds per scan, peak memory, Dice, agreement (runtimes.json, runtimes.md)."""
    from medssl.lab.speed import runtime_seconds
    from medssl.lab.speed import speed as _speed

    def names(value):
        return [m.strip() for m in (value.split(",") if isinstance(value, str) else value) if m.strip()]

    if runtimes:
        from medssl.data import load_datalist
        from medssl.clinic.segment import _resolve_bundle

        cases = (load_datalist(dataset_dir).get("test") or [])[: int(num_volumes)]
        if not cases:
            raise DataError(f"{Path(dataset_dir) / 'dataset.json'}: no 'test' list to time the runtimes on.")
        runtime_seconds(
            [c["image"] for c in cases],
            str(_resolve_bundle(bundle, index, None)),
            names(runtimes),
            labels=[c.get("label") for c in cases],
            out=out,
        )
        return
    overrides = {"patch_size": [int(x) for x in str(patch_size).strip("()[]").split(",")]} if patch_size else {}
    _speed(
        dataset_dir,
        out=out,
        warmup=warmup,
        iterations=iterations,
        overrides=overrides,
        weights=weights,
        num_volumes=num_volumes,
        modes=names(modes),
        repeats=int(repeats),
        bundles=names(bundles),
    )


COMMANDS = {
    "benchmark": benchmark,
    "demo": demo,
    "dev_split": dev_split,
    "dicom_node": dicom_node,
    "package": package,
    "prepare_la": prepare_la,
    "pull": pull,
    "sample_data": sample_data,
    "segment": segment,
    "speed": speed,
}


def main(argv=None) -> int:
    """Entry point of ``python -m medssl``: known errors print one ``error:`` line (the project's own reason where
    MONAI wrapped it) and exit 2; a batch in which some scans failed exits 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    try:
        fire.Fire(COMMANDS, command=argv, name="python -m medssl")
    except ScansFailed:
        return 1
    except (DataError, FileNotFoundError, FileExistsError, RuntimeError, ValueError) as e:  # ReleaseError too
        print(f"error: {data_error_message(e) or e}", file=sys.stderr)
        return 2
    return 0
