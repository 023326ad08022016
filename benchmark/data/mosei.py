"""``cmu-mosei``: CMU-MOSEI sentiment (text, audio, vision) from the aligned feature pickle.

Layout under the root: ``mosei_senti_data.pkl`` (option ``file``), the pickle that the MulT and
MultiBench loaders read::

    {"train" | "valid" | "test": {"text":   N×T×300 (GloVe),
                                  "audio":  N×T×74  (COVAREP),
                                  "vision": N×T×35  (Facet),
                                  "labels": N×1×1 sentiment score in [-3, 3], ...}}

Other entries (``id``, ...) are ignored; sequence lengths may differ between modalities (the
unaligned release). Labels: ``binary`` (default) is score >= 0 (non-negative) against < 0, with
``exclude_zero=true`` dropping the score-0 samples (MulT's non-zero binary protocol); ``7class``
is the score clipped to [-3, 3] and rounded, classes -3 … 3. Non-finite feature values (the
release's audio has some) are replaced by 0 and counted in the manifest.

The file is unpickled with a restricted unpickler that only builds numpy arrays, dicts, lists and
plain values: a pickle that names any other class or function is refused, so preparing a file
from elsewhere cannot run code.
"""

from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark.config import opt
from benchmark.data.base import DataInfo, ModalitySpec, MultimodalData, TensorSplit
from benchmark.data.cache import CacheWriter
from benchmark.data.ondisk import OnDiskDataset, fingerprint
from benchmark.errors import UsageError
from benchmark.registry import register_dataset

MODALITIES = {"text": 300, "audio": 74, "vision": 35}  # feature sizes of the standard release
SPLIT_KEYS = {"train": "train", "val": "valid", "test": "test"}
LABELINGS = ("binary", "7class")

# What a feature pickle may build: numpy arrays and scalars (under numpy 1 and 2 module names; from
# a buffer in protocol 5), ordered dicts, and the bytes decoding that protocol-2 pickles use.
SAFE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
    ("collections", "OrderedDict"), ("_codecs", "encode"),
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, and only numpy arrays, dicts and lists "
                                         "are loaded")
        with warnings.catch_warnings():  # numpy 2 warns on its numpy.core aliases
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def load_feature_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as fh:
            return NumpyOnlyUnpickler(fh, encoding="latin1").load()
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, ...: a corrupt or foreign file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot read the feature pickle {path} ({reason}); replace it with the aligned "
                         "CMU-MOSEI pickle (mosei_senti_data.pkl of MulT / MultiBench)") from None


@dataclass
class MoseiOptions:
    root: str = opt("", "folder holding the feature pickle (default $BMB_DATA_ROOT/CMU-MOSEI)", location=True)
    cache_dir: str = opt("", "dataset cache folder (default $BMB_CACHE_DIR or ~/.cache/balanced-mm-bench)", location=True)
    file: str = opt("mosei_senti_data.pkl", "the feature pickle, relative to the root")
    labels: str = opt("binary", "binary (score >= 0 vs < 0) or 7class (rounded score, -3 … 3)")
    exclude_zero: bool = opt(False, "binary only: drop the samples whose score is exactly 0")

    def validate(self) -> None:
        if self.labels not in LABELINGS:
            raise UsageError(f"dataset.labels must be one of {', '.join(LABELINGS)}, got {self.labels!r}")
        if self.exclude_zero and self.labels != "binary":
            raise UsageError("dataset.exclude_zero applies to labels=binary only; drop it or set labels=binary")


def class_labels(scores: np.ndarray, labeling: str) -> np.ndarray:
    if labeling == "binary":
        return (scores >= 0).astype(np.int64)
    return (np.round(np.clip(scores, -3.0, 3.0)) + 3).astype(np.int64)


@register_dataset("cmu-mosei")
class CmuMosei(OnDiskDataset):
    Options = MoseiOptions
    summary = "CMU-MOSEI sentiment, text + audio + vision features, 2 or 7 classes (on disk: aligned pickle)"
    display = "CMU-MOSEI"
    folder = "CMU-MOSEI"
    layout = ("mosei_senti_data.pkl: {'train'|'valid'|'test': {'text': N×T×300, 'audio': N×T×74, "
              "'vision': N×T×35, 'labels': N×1×1}} (MulT / MultiBench)")
    num_classes = 2

    def recipe(self, root: Path) -> dict[str, Any]:
        o = self.options
        return {"version": self.VERSION, "root": str(root), "file": o.file, "labels": o.labels,
                "exclude_zero": o.exclude_zero}

    def class_names(self, root: Path | None = None) -> list[str]:
        return ["negative", "non-negative"] if self.options.labels == "binary" else [str(k) for k in range(-3, 4)]

    def pickle_path(self, root: Path) -> Path:
        path = root / self.options.file
        if not path.is_file():
            raise UsageError(f"cmu-mosei feature pickle {path} is missing; set dataset.file to its name under "
                             f"the root; expected layout: {self.layout}")
        return path

    def split_arrays(self, path: Path, data: Any, split: str) -> dict[str, np.ndarray]:
        key = SPLIT_KEYS[split]
        where = f"{path} [{key!r}]"
        fix = f"; expected layout: {self.layout}"
        if not isinstance(data, dict) or not isinstance(data.get(key), dict):
            raise UsageError(f"{where} is missing or not a dict{fix}")
        out = {}
        for name in (*MODALITIES, "labels"):
            value = data[key].get(name)
            if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
                raise UsageError(f"{where}[{name!r}] is missing or not a numeric array{fix}")
            out[name] = value
        n = len(out["labels"])
        for name in MODALITIES:
            if out[name].ndim != 3 or len(out[name]) != n:
                raise UsageError(f"{where}[{name!r}] has shape {out[name].shape}, expected {n}×T×D (one "
                                 f"sequence per label){fix}")
        if out["labels"].size == 0 or out["labels"].size % n:
            raise UsageError(f"{where}['labels'] has shape {out['labels'].shape}, expected N×1×1{fix}")
        return out

    def _fill(self, root: Path, writer: CacheWriter) -> dict[str, Any]:
        path = self.pickle_path(root)
        data = load_feature_pickle(path)
        sizes, kept, replaced, shapes = {}, {}, dict.fromkeys(MODALITIES, 0), {}
        for split in SPLIT_KEYS:
            arrays = self.split_arrays(path, data, split)
            scores = arrays["labels"].reshape(len(arrays["labels"]), -1)[:, 0].astype(np.float64)
            keep = np.flatnonzero(scores != 0) if self.options.exclude_zero else np.arange(len(scores))
            for m in MODALITIES:
                x = arrays[m][keep].astype(np.float32)
                bad = ~np.isfinite(x)
                replaced[m] += int(bad.sum())
                x[bad] = 0.0
                if shapes.setdefault(m, x.shape[1:]) != x.shape[1:]:
                    raise UsageError(f"{path} [{SPLIT_KEYS[split]!r}][{m!r}] has steps × features "
                                     f"{x.shape[1:]}, {shapes[m]} in the other splits; expected layout: {self.layout}")
                writer.save_array(f"{split}.{m}", x)
            writer.save_array(f"{split}.labels", class_labels(scores[keep], self.options.labels))
            writer.save_array(f"{split}.scores", scores[keep].astype(np.float32))
            sizes[split], kept[split] = len(keep), keep.tolist()
        for split in ("train", "test"):
            if not sizes[split]:
                raise UsageError(f"{path}: the {SPLIT_KEYS[split]} split has no samples; expected layout: "
                                 f"{self.layout}")
        return {"classes": self.class_names(), "sizes": sizes, "splits": kept,
                "shapes": {m: list(s) for m, s in shapes.items()}, "nonfinite_replaced": replaced,
                "val_carved_from_train": False, "sources": fingerprint(root, {path})}

    def modality_specs(self, shapes: dict[str, list[int]] | None = None) -> list[ModalitySpec]:
        shapes = shapes or {m: [50, d] for m, d in MODALITIES.items()}
        return [ModalitySpec(m, "sequence", tuple(shapes[m]), "seq_transformer") for m in MODALITIES]

    def load(self) -> MultimodalData:
        cache, manifest, _ = self.ensure_cache()
        splits = {}
        for split in SPLIT_KEYS:
            inputs = {m: torch.from_numpy(cache.array(f"{split}.{m}")) for m in MODALITIES}
            splits[split] = TensorSplit(inputs, torch.from_numpy(cache.array(f"{split}.labels")))
        info = DataInfo(self.registered_name, self.modality_specs(manifest["shapes"]), len(manifest["classes"]),
                        manifest["classes"])
        return MultimodalData(info, splits, {**manifest, "cache": str(cache.dir)})

    def describe(self) -> dict[str, Any]:
        facts = super().describe()
        facts["classes"] = len(self.class_names())
        return facts
