"""Data: InsightFace RecordIO sets, image lists, verification .bin files, the synthetic set.

Modules: ``recordio`` (MXNet indexed RecordIO reader/writer, the one place for the layout),
``insightface`` (``InsightFaceRecDataset``), ``filelist`` (``ImageListDataset``, train/val
split), ``verification`` (``load_bin`` through a restricted unpickler, ``decode_pairs``),
``transforms`` (112x112, InsightFace normalisation), ``synthetic`` (``make_synthetic``: the
synthetic face-like set and its long-tailed variant), ``hangul`` (``make_hangul``: rendered
Hangul syllables), ``accuracy_set`` (``read_set_info``: the layout and metadata those sets
share).
Names are imported on first use so ``import hfsoftmax.data`` stays cheap.
"""
import importlib

_EXPORTS = {
    "RecordIOReader": "recordio", "RecordIOWriter": "recordio", "RecordIOError": "recordio",
    "IRHeader": "recordio", "pack": "recordio", "unpack": "recordio",
    "image_format": "recordio",
    "InsightFaceRecDataset": "insightface", "read_property": "insightface",
    "ImageListDataset": "filelist", "read_list": "filelist", "write_list": "filelist",
    "split_train_val": "filelist",
    "load_bin": "verification", "dump_bin": "verification", "decode_pairs": "verification",
    "UnsafePickleError": "verification",
    "CorruptImageError": "image", "skip_none_collate": "image",
    "train_transform": "transforms", "eval_transform": "transforms",
    "normalize_uint8": "transforms",
    "make_synthetic": "synthetic",
    "make_hangul": "hangul",
    "read_set_info": "accuracy_set", "prepare_set": "accuracy_set",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'hfsoftmax.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
