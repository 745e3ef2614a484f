"""Loading and checking volumes: the data-hygiene transforms of the bundle pipelines (no paper).

- :class:`LoadVolumed`: MONAI's ``LoadImaged`` that names an unreadable file.
- :class:`CheckVolumed`: finite intensities and label values in the expected classes, naming the file.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from medssl.data import DataError

__all__ = ["CheckVolumed", "LoadVolumed"]


def _reason(e: BaseException) -> str:
    # on one line: nibabel's "Expected N bytes, got M bytes from FILE\n - could the file be damaged?" would otherwise
    # end the error (and a run's last line) without the file's name
    return " ".join(f"{type(e).__name__}: {e}".split())


def _source(data: Mapping, key: Hashable) -> str:
    meta = getattr(data[key], "meta", None) or data.get(f"{key}_meta_dict", {})
    return str(meta.get("filename_or_obj", f"<{key}>"))


class CheckVolumed(MapTransform):
    """Check loaded volumes before they reach a network: finite intensities, label values in ``classes``.

    Placed right after ``LoadImaged`` (channel first) in the deterministic part of a pipeline, so a
    ``CacheDataset`` finds bad voxels once, at start-up, and the error names the file.

    Args:
        keys: the image keys to check for NaN/Inf.
        label_keys: the label keys to check for values outside ``classes`` (absent keys are skipped,
            so one pipeline serves labeled and unlabeled entries).
        classes: the allowed label values.

    Raises:
        DataError: a NaN/Inf voxel, or a label value outside ``classes``, with the file name.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_keys: KeysCollection = (),
        classes: Sequence[int] = (0, 1),
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_keys = [label_keys] if isinstance(label_keys, str) else list(label_keys)
        self.classes = torch.as_tensor(list(classes))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            if not torch.isfinite(img).all():
                bad = int((~torch.isfinite(img)).sum())
                raise DataError(f"{_source(d, key)}: {bad} NaN/Inf voxels; expected finite intensities.")
        for key in self.label_keys:
            if key not in d:
                continue
            values = torch.unique(torch.as_tensor(d[key]))
            extra = values[~torch.isin(values, self.classes.to(values.dtype))]
            if extra.numel():
                raise DataError(
                    f"{_source(d, key)}: label values {np.round(extra.cpu().numpy()[:10], 4).tolist()} outside the "
                    f"expected classes {self.classes.tolist()}."
                )
        return d


class LoadVolumed(MapTransform):
    """MONAI's ``LoadImaged`` that reports an unreadable file as a :class:`medssl.data.DataError` naming it.

    ``LoadImaged`` lets the reader's own exception through (an ``EOFError`` of gzip, a ``ValueError`` of nibabel,
    ...), wrapped by MONAI's transform error, without saying which of a case's files failed. This loads through
    ``LoadImaged`` unchanged and, on failure, reads each of the entry's files on its own to name the culprit.

    Args:
        keys, **kwargs: as ``monai.transforms.LoadImaged`` (``ensure_channel_first``, ``image_only``, ...).

    Raises:
        DataError: ``"<file>: not a readable NIfTI volume (<reason>)"``.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs) -> None:
        from monai.transforms import LoadImaged

        super().__init__(keys, allow_missing_keys)
        self.loader = LoadImaged(keys, allow_missing_keys=allow_missing_keys, **kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        try:
            return self.loader(data)
        except Exception as e:  # the readers raise many types; name the file instead
            culprit, reason = None, _reason(e)
            for key in self.key_iterator(dict(data)):
                try:
                    import nibabel as nib

                    np.asanyarray(nib.load(str(data[key])).dataobj)
                except Exception as inner:
                    culprit, reason = data[key], _reason(inner)
                    break
            files = culprit or ", ".join(str(data[k]) for k in self.key_iterator(dict(data)))
            raise DataError(f"{files}: not a readable NIfTI volume ({reason}).") from e
