"""MONAI Deploy app: a segmentation bundle (default the released la_seg_finetune) on a DICOM folder, a DICOM SEG out.

    bash apps/deploy/make_env.sh      # once: .venv-deploy, the SDK's environment (reusing .venv's torch)
    .venv-deploy/bin/python apps/deploy/app.py -i DICOM_FOLDER -o OUT [-m BUNDLE_FOLDER]

Built from the MONAI Deploy App SDK's own operators: DICOMDataLoaderOperator -> DICOMSeriesSelectorOperator (the
series of the bundle's modality, MR or CT) -> DICOMSeriesToVolumeOperator -> MonaiBundleInferenceOperator (the
bundle's preprocessing, inferer and postprocessing, Invertd included) -> DICOMSegmentationWriterOperator. ``-m``
is a bundle folder with ``models/model.pt`` (default ``$HOLOSCAN_MODEL_PATH``); without one the bundle is pulled by
name from the checkout's ``bundle_index.json`` (checksum verified) into ``$MEDSSL_HOME/bundles``. The SEG has one
segment per label of the bundle, named and coded as ``segment`` codes them (:func:`medssl.task.read_task`,
:func:`medssl.clinic.dicom.segment_codes`).

Two things the bundle needs of the SDK's inference operator (:class:`MedsslBundleInferenceOperator`):

- the bundle loads files with ``medssl.transforms.LoadVolumed``, which the operator's name filter (it drops
  ``LoadImage``/``SaveImage`` steps) does not know; on the in-memory volume it becomes ``EnsureChannelFirstd``;
- the network is the bundle's ``prob_network`` with ``models/model.pt`` (softmax, the bundle's precision and memory
  layout), as ``python -m medssl segment`` runs it, instead of the TorchScript logits: ``Invertd`` interpolates what
  the network gives, so logits would not give the same label map as ``segment``.
"""

import json
import logging
import sys
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application, Image, IOType
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_seg_writer_operator import DICOMSegmentationWriterOperator, SegmentDescription
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator
from monai.deploy.operators.monai_bundle_inference_operator import IOMapping, MonaiBundleInferenceOperator
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

BUNDLE = "la_seg_finetune"


def selection_rules(modality: str) -> str:
    """The image series of a study of the bundle's modality (localizers, SEG and other objects are not)."""
    rule = {"name": modality, "conditions": {"Modality": f"(?i){modality}"}}
    return json.dumps({"selections": [rule]})


def segment_descriptions(task, name: str, version: str) -> list:
    """One SDK SegmentDescription per foreground label, in label order, with the bundle's codes."""
    from medssl.clinic.dicom import segment_codes

    out = []
    for value, name in sorted(task.names.items()):
        code, category = segment_codes(name, *task.codes.get(value, (None, None)))
        out.append(
            SegmentDescription(
                segment_label=name[:64].capitalize(),
                segmented_property_category=Code(*category),
                segmented_property_type=Code(*code),
                algorithm_name=name,
                algorithm_family=codes.DCM.ArtificialIntelligence,
                algorithm_version=str(version),
            )
        )
    return out


class MedsslBundleInferenceOperator(MonaiBundleInferenceOperator):
    """The SDK's bundle inference operator, with the bundle's file loader replaced by ``EnsureChannelFirstd`` and the
    bundle's ``prob_network`` (weights from ``models/model.pt``) as the network; see the module's docstring."""

    def _init_config(self, config_names):
        import torch
        from monai.transforms import EnsureChannelFirstd

        from medssl.transforms import LoadVolumed

        super()._init_config(config_names)
        self._preproc.transforms = tuple(
            (
                EnsureChannelFirstd(keys=t.keys, channel_dim="no_channel", allow_missing_keys=True)
                if isinstance(t, LoadVolumed)
                else t
            )
            for t in self._preproc.transforms
        )
        self._parser.get_parsed_content("initialize")
        network = self._parser.get_parsed_content("network")
        weights = torch.load(self.bundle_path / "models" / "model.pt", map_location=self._device, weights_only=True)
        network.load_state_dict(weights)
        self._prob_network = self._parser.get_parsed_content("prob_network").eval()

    def predict(self, data, *args, **kwargs):
        return self._inferer(inputs=data, network=self._prob_network, *args, **kwargs)


def bundle_folder(model_path) -> Path:
    """``-m``'s bundle folder, or the released bundle pulled by name (checksum verified)."""
    if model_path and (Path(model_path) / "configs" / "inference.json").is_file():
        return Path(model_path).resolve()
    from medssl.bundle import cache_dir, default_index
    from medssl.clinic.release import pull

    return Path(pull(BUNDLE, bundle_dir=str(cache_dir() / "bundles"), index=default_index())).resolve()


class LASegmentationApp(Application):
    """A DICOM series of the bundle's modality in, its labels as a DICOM SEG out (default the released la_seg_finetune:
    MR in, the left atrium out)."""

    def compose(self):
        from medssl.task import read_task

        context: AppContext = Application.init_app_context(self.argv)
        bundle = bundle_folder(context.model_path)  # -m, else $HOLOSCAN_MODEL_PATH, else pulled
        version = json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
        task = read_task(bundle)
        logging.info(f"bundle {bundle} (version {version}): {task.modality} series, labels {task.names}")
        loader = DICOMDataLoaderOperator(
            self, CountCondition(self, 1), input_folder=Path(context.input_path), name="dicom_loader"
        )
        selector = DICOMSeriesSelectorOperator(self, rules=selection_rules(task.modality), name="series_selector")
        to_volume = DICOMSeriesToVolumeOperator(self, name="series_to_volume")
        infer = MedsslBundleInferenceOperator(
            self,
            app_context=context,
            bundle_path=bundle,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
            name="bundle_inference",
        )
        output = Path(context.output_path)
        segments = segment_descriptions(task, bundle.name.split("_v")[0], version)
        writer = DICOMSegmentationWriterOperator(self, segment_descriptions=segments, output_folder=output, name="seg")
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(to_volume, infer, {("image", "image")})
        self.add_flow(infer, writer, {("pred", "seg_image")})
        self.add_flow(selector, writer, {("study_selected_series_list", "study_selected_series_list")})


if __name__ == "__main__":
    LASegmentationApp().run()
    sys.exit(0)
