"""Latent datasets: klvae_encode_dataset and klvae_latent_stats, and a reader of the
folder they write that needs numpy alone (docs/latents.md describes the files)."""
from __future__ import annotations

import ctypes
import json
import os
import struct
from ctypes import byref, c_double, c_int

import numpy as np

from . import _lib
from ._lib import DatasetProgress, check

# safetensors dtypes as numpy reads them; BF16 has no numpy type (widened below)
_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
          "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def _progress_dict(p: DatasetProgress) -> dict:
    d = {name: getattr(p, name) for name, _ in DatasetProgress._fields_[2:]}
    for key in ("skipped_path", "skipped_reason"):
        d[key] = d[key].decode("utf-8", "replace") if d[key] is not None else None
    for key in ("finished", "dataset_complete"):
        d[key] = bool(d[key])
    return d


def encode_dataset(model, data, out_dir, progress=None, **options) -> dict:
    """Encodes the images of ``data`` (a folder, or a text file listing paths) into a
    latent dataset in ``out_dir`` (klvae_encode_dataset; ``bin/klvae encode-dataset``
    is the same). ``options`` are the dataset keys of docs/options.md (``size=256``,
    ``buckets="1024,64"``, ``flip=True``, ``store="sample"``, ``dtype="bf16"``,
    ``scale_latents=True``, ``shard_size``, ``part="0/4"``, ``seed``, ...).

    ``progress(d)``, when given, is called with a dict of the counts (the fields of
    klvae_dataset_progress_t) after each batch, once per skipped file
    (``d["skipped_path"]``, ``d["skipped_reason"]``) and at the end. Returning True
    stops the run; so does an exception (KeyboardInterrupt too), which is raised
    again once the library has stopped. Shards already written stay: calling again
    continues. Returns the summary dict (``finished`` False when stopped)."""
    from ._api import _Options, _path  # the shared argument helpers

    cdata, cout = _path(data, "data"), _path(out_dir, "out_dir")
    raised = []

    def on_progress(_user, p):
        try:
            return 1 if progress is not None and progress(_progress_dict(p.contents)) else 0
        except BaseException as e:  # noqa: B902 - stop the C loop, raise it afterwards
            raised.append(e)
            return 1

    # Always a callback: it is where Ctrl-C reaches a long run.
    callback = _lib.PROGRESS_FN(on_progress)
    summary = DatasetProgress()
    summary.struct_size = ctypes.sizeof(DatasetProgress)
    with _Options(options) as opts, model._lock:
        status = _lib.lib.klvae_encode_dataset(model._live(), cdata, cout, opts, callback, None,
                                               byref(summary))
    if raised:
        raise raised[0]
    check(status)
    return _progress_dict(summary)


def latent_stats(shards_dir) -> dict:
    """The latents' statistics of a finished dataset folder (klvae_latent_stats):
    ``{"mean": [...], "std": [...], "scaling_factor": s, "shift_factor": t}`` per
    channel in the raw latent space; also written to its manifest.json."""
    from ._api import _path

    cdir = _path(shards_dir, "shards_dir")
    channels = c_int()
    check(_lib.lib.klvae_latent_stats(cdir, 0, byref(channels), None, None, None, None))
    n = channels.value
    mean, std = (c_double * n)(), (c_double * n)()
    scale, shift = c_double(), c_double()
    check(_lib.lib.klvae_latent_stats(cdir, n, byref(channels), mean, std, byref(scale),
                                      byref(shift)))
    return {"mean": list(mean), "std": list(std), "scaling_factor": scale.value,
            "shift_factor": shift.value}


def read_safetensors(path, widen: bool = True):
    """``(arrays, metadata)`` of a safetensors file, with numpy alone. Arrays share
    the file's bytes (read once); BF16 and, with ``widen``, F16 become float32
    (exactly: every value of either is a float32)."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise ValueError(f"{path}: its header length {n} exceeds the file")
    header = json.loads(raw[8:8 + n])
    metadata = header.pop("__metadata__", {}) or {}
    arrays = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = _NUMPY.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}")
        a = np.frombuffer(raw, dtype=dtype, count=(end - begin) // np.dtype(dtype).itemsize,
                          offset=8 + n + begin).reshape(info["shape"])
        if info["dtype"] == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] == "F16" and widen:
            a = a.astype(np.float32)
        arrays[name] = a
    return arrays, metadata


class LatentShard:
    """One shard: ``arrays`` (``mean``/``logvar`` or ``latent``, their ``*_flip`` twins
    with flip, ``original_size``, ``crop_top_left``; latents as float32), ``records``
    (one dict per row: path, file, row, original_size, resized_size, crop), ``errors``
    (the shard's files that could not be read), ``bucket`` (h, w) and ``metadata``."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        self.arrays, self.metadata = read_safetensors(self.path)
        self.records = json.loads(self.metadata.get("records", "[]"))
        self.errors = json.loads(self.metadata.get("errors", "[]"))
        self.bucket = tuple(json.loads(self.metadata.get("bucket", "[0, 0]")))

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"LatentShard({self.name!r}, rows={len(self)}, bucket={self.bucket})"


class LatentFolder:
    """A folder written by :func:`encode_dataset` (or ``klvae encode-dataset``):
    ``manifest`` (dict), ``shard_names``, ``len()`` (images stored), iteration over
    :class:`LatentShard` in order, ``records()`` (the lines of index.jsonl) and
    ``errors()`` (those of errors.jsonl). The dataset must be complete."""

    def __init__(self, folder):
        self.folder = os.fspath(folder)
        with open(os.path.join(self.folder, "manifest.json"), encoding="utf-8") as f:
            self.manifest = json.load(f)
        if not self.manifest.get("complete"):
            raise ValueError(f"{self.folder}: the dataset is not complete (a part is missing "
                             "or still running)")
        self.shard_names = [s["file"] for s in self.manifest["shards"]]

    def __len__(self) -> int:
        return int(self.manifest["counts"]["images"])

    def __iter__(self):
        for name in self.shard_names:
            yield LatentShard(os.path.join(self.folder, name))

    def _lines(self, name):
        with open(os.path.join(self.folder, name), encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)

    def records(self):
        return self._lines(self.manifest.get("index", "index.jsonl"))

    def errors(self):
        return self._lines(self.manifest.get("errors", "errors.jsonl"))

    def __repr__(self) -> str:
        return f"LatentFolder({self.folder!r}, images={len(self)}, shards={len(self.shard_names)})"

