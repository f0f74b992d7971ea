"""Models, trainers and images on top of the ctypes declarations of _lib."""
from __future__ import annotations

import ctypes
import operator
import os
import threading
from ctypes import POINTER, byref, c_char_p, c_float, c_int, c_void_p

import numpy as np

from . import _lib
from ._lib import STEP_STATS_FIELDS, KlvaeError, Status, StepStats, check

_float_p = POINTER(c_float)
_INT_MAX = 2**31 - 1
_MISSING = object()


# ---------------------------------------------------------------------------
# Conversions at the boundary
# ---------------------------------------------------------------------------

def _cstr(value, what: str) -> bytes:
    """UTF-8 bytes for a C string; refuses embedded NULs (C would cut there)."""
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode("utf-8")
    else:
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if b"\0" in data:
        raise ValueError(f"{what} contains a NUL character: {value!r}")
    return data


def _path(path, what: str = "path") -> bytes:
    """A file system path (str, bytes or os.PathLike) as the bytes C expects."""
    try:
        data = os.fsencode(path)
    except TypeError:
        raise TypeError(f"{what} must be a str, bytes or os.PathLike, not "
                        f"{type(path).__name__}") from None
    if not data:
        raise ValueError(f"{what} is empty")
    if b"\0" in data:
        raise ValueError(f"{what} contains a NUL character: {path!r}")
    return data


def _option_text(value) -> str:
    """An option value as libklvae's option text."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, os.PathLike):
        return os.fsencode(value)  # bytes: any path the file system holds
    return str(value)


class _Options:
    """A klvae_options_t built from keyword arguments, freed on exit."""

    def __init__(self, options: dict):
        self.ptr = c_void_p()
        check(_lib.lib.klvae_options_create(byref(self.ptr)))
        try:
            for key, value in options.items():
                check(_lib.lib.klvae_options_set(self.ptr, _cstr(key, "option key"),
                                                 _cstr(_option_text(value), f"option {key}")))
        except BaseException:
            self.close()
            raise

    def close(self):
        if self.ptr:
            _lib.lib.klvae_options_free(self.ptr)
            self.ptr = c_void_p()

    def __enter__(self):
        return self.ptr

    def __exit__(self, *exc):
        self.close()


def _get_text(fn, handle, key: str) -> str:
    """Calls a klvae_*_get(handle, key, buf, size) function with a buffer of the
    size it needs: a first call with 256 bytes, and when that is too small, a
    second with the size klvae_last_needed_size() reports."""
    ckey = _cstr(key, "key")
    size = 256
    for _ in range(3):
        buf = ctypes.create_string_buffer(size)
        status = fn(handle, ckey, buf, size)
        if status == Status.BUFFER_TOO_SMALL:
            size = max(int(_lib.lib.klvae_last_needed_size()), size + 1)
            continue
        check(status)
        return buf.value.decode("utf-8", "replace")
    check(status)


def _pointer(arr: np.ndarray):
    """The data pointer of a C-contiguous float32 array, as float *."""
    return arr.ctypes.data_as(_float_p)


def _float32(x, name: str) -> np.ndarray:
    """Wraps x as an ndarray without copying (np.asarray); refuses non-numbers."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers (float32 preferred); got dtype {arr.dtype}")
    return arr


def _contiguous(arr: np.ndarray) -> np.ndarray:
    """arr itself when it is native float32, C-contiguous and aligned; else one converted
    copy (np.ascontiguousarray(arr, dtype=np.float32), which would keep an unaligned
    buffer as it is)."""
    if arr.dtype == np.float32 and arr.flags.c_contiguous and arr.flags.aligned:
        return arr
    return np.array(arr, dtype=np.float32, order="C", copy=True)


def _batch4(arr: np.ndarray, name: str, layout: str) -> np.ndarray:
    """A 4-D view of arr: 3-D (c, h, w) becomes a batch of one (1, c, h, w)."""
    if arr.ndim == 3:
        arr = arr[np.newaxis]
    elif arr.ndim != 4:
        raise ValueError(f"{name} must be a 4-D array (n, {layout}) or a 3-D array ({layout}); "
                         f"got shape {arr.shape}")
    for dim, size in zip("nchw", arr.shape):
        if size <= 0:
            raise ValueError(f"{name} has an empty dimension: shape {arr.shape}")
        if size > _INT_MAX:
            raise ValueError(f"{name} dimension {dim} = {size} does not fit in a C int")
    return arr


def _seed(seed) -> int:
    try:
        value = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an integer, not {type(seed).__name__}") from None
    if not 0 <= value < 2**64:
        raise ValueError(f"seed must be in 0 .. 2**64 - 1; got {value}")
    return value


# ---------------------------------------------------------------------------
# Handles
# ---------------------------------------------------------------------------

class _Handle:
    """A library handle: freed exactly once, by close(), `with` or the garbage collector.

    Every call on a handle holds its lock, so one handle is used by one thread at a
    time (the library's rule); different handles run in parallel (ctypes releases
    the GIL during foreign calls).
    """

    _kind = "handle"
    _handle = None  # int (the C pointer) while open, None once freed

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} objects are made by its class methods")

    def _setup(self, handle: int, free_fn) -> None:
        self._lock = threading.RLock()
        self._free_fn = free_fn  # kept here: module globals may be gone when __del__ runs
        self._handle = handle

    @property
    def closed(self) -> bool:
        return self._handle is None

    def _live(self) -> int:
        """The C pointer; raises ValueError once closed. Call with the lock held."""
        if self._handle is None:
            raise ValueError(f"{self._kind} is closed")
        return self._handle

    def __enter__(self):
        self._live()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()

    def __reduce__(self):
        # copy.copy or pickle would duplicate the C pointer and free it twice
        raise TypeError(f"cannot copy or pickle a klvae {type(self).__name__}")


class Model(_Handle):
    """A loaded or created autoencoder (klvae_model_t).

    Make one with :meth:`Model.load` or :meth:`Model.create`. Release it with
    :meth:`close` or a ``with`` block (the garbage collector frees it too). A model
    that a :class:`Trainer` still uses cannot be closed: close the trainer first.
    """

    _kind = "model"
    _close_pending = False

    @classmethod
    def load(cls, path, **options) -> "Model":
        """Loads a diffusers folder or one .safetensors file (klvae_model_load).

        ``options`` are library option keys (``bin/klvae options``), e.g.
        ``threads=2``, ``norm_num_groups=8``, ``scaling_factor=0.13025``; values are
        converted with ``str()`` (``True``/``False`` as ``"true"``/``"false"``, lists as
        ``"16,32"``, ``None`` as ``"none"``). An unknown key or bad value raises
        :class:`KlvaeError` with status ``OPTION``.
        """
        cpath = _path(path)
        out = c_void_p()
        with _Options(options) as opts:
            check(_lib.lib.klvae_model_load(cpath, opts, byref(out)))
        return cls._wrap(out.value)

    @classmethod
    def create(cls, **options) -> "Model":
        """A freshly initialised model (klvae_model_create): ``config="tiny"``,
        ``"small"`` or ``"sd"`` (the default), any config key on top, weights drawn
        from ``seed``."""
        out = c_void_p()
        with _Options(options) as opts:
            check(_lib.lib.klvae_model_create(opts, byref(out)))
        return cls._wrap(out.value)

    @classmethod
    def _wrap(cls, handle: int) -> "Model":
        self = object.__new__(cls)
        self._open_trainers = 0
        try:
            L = _lib.lib
            # The config never changes (training changes weights only): read it once.
            self._in_channels = L.klvae_model_in_channels(handle)
            self._out_channels = L.klvae_model_out_channels(handle)
            self._latent_channels = L.klvae_model_latent_channels(handle)
            self._factor = L.klvae_model_downsampling_factor(handle)
            # float32 values, as the shortest decimal that rounds to them (0.18215)
            self._scaling_factor = float(str(np.float32(L.klvae_model_scaling_factor(handle))))
            self._shift_factor = float(str(np.float32(L.klvae_model_shift_factor(handle))))
            self._parameter_count = int(L.klvae_model_parameter_count(handle))
            self._backend = L.klvae_model_backend(handle).decode()
        except BaseException:
            _lib.lib.klvae_model_free(handle)
            raise
        self._setup(handle, _lib.lib.klvae_model_free)
        return self

    # ---- life cycle ----

    @property
    def closed(self) -> bool:
        return self._handle is None or self._close_pending

    def _live(self) -> int:
        if self._handle is None or self._close_pending:
            raise ValueError("model is closed")
        return self._handle

    def close(self) -> None:
        """Frees the model. Safe to call again. Raises RuntimeError while an open
        Trainer uses the model (close the trainer first)."""
        self._close(defer=False)

    def __exit__(self, exc_type, exc, tb):
        # Leaving by an exception: do not hide it behind "a trainer is open";
        # free the model when its last trainer is closed instead.
        self._close(defer=exc_type is not None)

    def __del__(self):
        try:
            self._close(defer=True)
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def _close(self, defer: bool) -> None:
        if self._handle is None:
            return
        with self._lock:
            if self._handle is None or self._close_pending:
                return
            if self._open_trainers:
                if not defer:
                    raise RuntimeError(
                        f"model is in use by {self._open_trainers} open Trainer(s); close "
                        "the trainer before its model (the trainer borrows the model's "
                        "backend and weights)")
                self._close_pending = True  # freed by the last trainer's close
                return
            self._free_now()

    def _free_now(self) -> None:
        handle, self._handle = self._handle, None
        self._free_fn(handle)

    def _trainer_closed(self) -> None:
        """Called by a trainer after it freed itself, with this model's lock held."""
        self._open_trainers -= 1
        if self._close_pending and self._open_trainers == 0 and self._handle is not None:
            self._free_now()

    def __repr__(self) -> str:
        if self.closed:
            return "<klvae.Model (closed)>"
        return (f"<klvae.Model {self._backend} in={self._in_channels} "
                f"latent={self._latent_channels} f={self._factor} "
                f"parameters={self._parameter_count}>")

    # ---- config ----

    def _config(self, value):
        if self.closed:
            raise ValueError("model is closed")
        return value

    in_channels = property(lambda self: self._config(self._in_channels),
                           doc="Image channels into the encoder.")
    out_channels = property(lambda self: self._config(self._out_channels),
                            doc="Image channels out of the decoder.")
    latent_channels = property(lambda self: self._config(self._latent_channels),
                               doc="Channels of the latent.")
    downsampling_factor = property(lambda self: self._config(self._factor),
                                   doc="f: image sides are f times the latent sides (8 for SD).")
    scaling_factor = property(lambda self: self._config(self._scaling_factor),
                              doc="The config's scaling_factor (never applied by the library).")
    shift_factor = property(lambda self: self._config(self._shift_factor),
                            doc="The config's shift_factor, 0.0 when it has none.")
    parameter_count = property(lambda self: self._config(self._parameter_count),
                               doc="Number of scalar parameters.")
    backend = property(lambda self: self._config(self._backend),
                       doc='The backend in use: "cpu" or "cuda".')

    def get(self, key: str) -> str:
        """The model's value of an option key as text (klvae_model_get), e.g.
        ``get("block_out_channels") == "128,256,512,512"``, ``get("threads")``."""
        with self._lock:
            return _get_text(_lib.lib.klvae_model_get, self._live(), key)

    def save(self, path) -> None:
        """Writes the model as a diffusers folder (klvae_model_save)."""
        cpath = _path(path)
        with self._lock:
            check(_lib.lib.klvae_model_save(self._live(), cpath))

    # ---- inference ----

    def _images(self, images, name: str, min_side: int = 1) -> np.ndarray:
        arr = _batch4(_float32(images, name), name, f"{self._in_channels}, h, w")
        n, c, h, w = arr.shape
        if c != self._in_channels:
            raise ValueError(f"{name} have {c} channels (shape {arr.shape}); this model "
                             f"takes {self._in_channels}")
        f = self._factor
        if h % f or w % f or h < min_side or w < min_side:
            need = f"positive multiples of the downsampling factor {f}"
            if min_side > 1:
                need += f" and at least {min_side}"
            raise ValueError(f"{name} are {h} x {w} (shape {arr.shape}); height and width "
                             f"must be {need}")
        return _contiguous(arr)

    def _latents(self, z, name: str) -> np.ndarray:
        arr = _batch4(_float32(z, name), name, f"{self._latent_channels}, h, w")
        if arr.shape[1] != self._latent_channels:
            raise ValueError(f"{name} has {arr.shape[1]} channels (shape {arr.shape}); this "
                             f"model's latents have {self._latent_channels}")
        return arr

    def encode(self, images):
        """Encodes images to the posterior: returns ``(mean, logvar)``.

        images: float32 (n, in_channels, h, w) in [-1, 1], h and w multiples of
        :attr:`downsampling_factor`; a 3-D (c, h, w) array is a batch of one. Results
        are new float32 arrays (n, latent_channels, h / f, w / f), always 4-D.
        """
        self._closed_check()
        x = self._images(images, "images")
        n, _, h, w = x.shape
        f = self._factor
        mean = np.empty((n, self._latent_channels, h // f, w // f), np.float32)
        logvar = np.empty_like(mean)
        with self._lock:
            check(_lib.lib.klvae_encode(self._live(), _pointer(x), n, h, w,
                                        _pointer(mean), _pointer(logvar)))
        return mean, logvar

    def sample(self, mean, logvar, seed):
        """Draws ``z = mean + exp(logvar / 2) * eps`` with the library's Philox
        generator: the same seed gives the same z everywhere. Returns a new array."""
        self._closed_check()
        m = self._latents(mean, "mean")
        lv = self._latents(logvar, "logvar")
        if m.shape != lv.shape:
            raise ValueError(f"mean and logvar differ in shape: {m.shape} and {lv.shape}")
        m, lv = _contiguous(m), _contiguous(lv)
        s = _seed(seed)
        n, _, lh, lw = m.shape
        z = np.empty_like(m)
        with self._lock:
            check(_lib.lib.klvae_sample(self._live(), _pointer(m), _pointer(lv), n, lh, lw, s,
                                        _pointer(z)))
        return z

    def decode(self, z):
        """Decodes latents (n, latent_channels, h, w) (or 3-D, a batch of one) into
        images (n, out_channels, h * f, w * f), a new float32 array, not clamped."""
        self._closed_check()
        arr = self._latents(z, "z")
        n, _, lh, lw = arr.shape
        f = self._factor
        if lh * f > _INT_MAX or lw * f > _INT_MAX:
            raise ValueError(f"z is {lh} x {lw}: the decoded image would be too large")
        arr = _contiguous(arr)
        images = np.empty((n, self._out_channels, lh * f, lw * f), np.float32)
        with self._lock:
            check(_lib.lib.klvae_decode(self._live(), _pointer(arr), n, lh, lw,
                                        _pointer(images)))
        return images

    def _closed_check(self) -> None:
        # before validating and allocating; the call itself checks again under the lock
        if self.closed:
            raise ValueError("model is closed")


class Trainer(_Handle):
    """The LDM training step on a model (klvae_trainer_t).

    ``Trainer(model, **options)`` takes trainer option keys (``learning_rate=3e-4``,
    ``ema_decay=0.999``, ``preset="ldm"``, ``seed=5``...). The trainer keeps a
    reference to its model, whose weights change with every step. Close the
    trainer (or leave its ``with`` block) before the model: ``model.close()``
    raises RuntimeError while a trainer is open.
    """

    _kind = "trainer"

    def __init__(self, model: Model, **options):
        if not isinstance(model, Model):
            raise TypeError(f"Trainer needs a klvae.Model, not {type(model).__name__}")
        self._model = model
        out = c_void_p()
        with _Options(options) as opts:
            with model._lock:
                check(_lib.lib.klvae_trainer_create(model._live(), opts, byref(out)))
                model._open_trainers += 1
        self._setup(out.value, _lib.lib.klvae_trainer_free)

    @property
    def model(self) -> Model:
        return self._model

    def close(self) -> None:
        """Frees the trainer (not the model). Safe to call again."""
        if self._handle is None:
            return
        with self._lock:
            model = self._model
            with model._lock:  # the trainer shares the model's backend
                if self._handle is None:
                    return
                handle, self._handle = self._handle, None
                self._free_fn(handle)
                model._trainer_closed()

    def __del__(self):
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def _both(self):
        """(trainer, model) pointers; call with both locks held."""
        handle = self._live()
        if self._model.closed:
            raise ValueError("trainer's model is closed")
        return handle, self._model._handle

    def __repr__(self) -> str:
        if self.closed:
            return "<klvae.Trainer (closed)>"
        return f"<klvae.Trainer step_count={self.step_count} model={self._model!r}>"

    def step(self, images) -> dict:
        """One optimizer step on images (n, in_channels, h, w) in [-1, 1] (3-D: a batch
        of one); h, w multiples of the downsampling factor and at least 16, n divisible
        by grad_accum. Returns every field of klvae_step_stats_t as a dict (``step``,
        ``total_loss``, ``rec_loss``, ... ``seconds``, ``skipped``, ``skipped_steps``)."""
        with self._lock:
            self._both()
        x = self._model._images(images, "images", min_side=16)
        stats = StepStats()
        stats.struct_size = ctypes.sizeof(StepStats)
        with self._lock, self._model._lock:
            handle, _ = self._both()
            accum = int(_get_text(_lib.lib.klvae_trainer_get, handle, "grad_accum"))
            n, _, h, w = x.shape
            if n % accum:
                raise ValueError(f"the batch of {n} images is not divisible by "
                                 f"grad_accum = {accum}")
            check(_lib.lib.klvae_trainer_step(handle, _pointer(x), n, h, w, byref(stats)))
        return {name: getattr(stats, name) for name in STEP_STATS_FIELDS}

    def save(self, path) -> None:
        """Writes a checkpoint (one safetensors file) that :meth:`load` resumes exactly."""
        cpath = _path(path)
        with self._lock, self._model._lock:
            check(_lib.lib.klvae_trainer_save(self._both()[0], cpath))

    def load(self, path) -> None:
        """Resumes from a checkpoint of a trainer with the same architecture."""
        cpath = _path(path)
        with self._lock, self._model._lock:
            check(_lib.lib.klvae_trainer_load(self._both()[0], cpath))

    def export(self, path, ema: bool = False) -> None:
        """Writes the autoencoder (the EMA weights with ema=True) as a diffusers folder."""
        cpath = _path(path)
        with self._lock, self._model._lock:
            check(_lib.lib.klvae_trainer_export(self._both()[0], cpath, 1 if ema else 0))

    @property
    def step_count(self) -> int:
        """Optimizer steps made so far (after a load: those of the checkpoint)."""
        with self._lock:
            return int(_lib.lib.klvae_trainer_step_count(self._live()))

    def get(self, key: str) -> str:
        """The value the trainer uses for a trainer key, as text (klvae_trainer_get)."""
        with self._lock:
            return _get_text(_lib.lib.klvae_trainer_get, self._live(), key)

    def set_note(self, key: str, value: str) -> None:
        """Stores a small key/value string in the trainer's checkpoints (<= 255 bytes each,
        at most 32 notes)."""
        ckey, cvalue = _cstr(key, "note key"), _cstr(value, "note value")
        with self._lock:
            check(_lib.lib.klvae_trainer_set_note(self._live(), ckey, cvalue))

    def get_note(self, key: str, default=_MISSING) -> str:
        """A note's value; a missing key raises KlvaeError (OPTION) unless default is given."""
        with self._lock:
            try:
                return _get_text(_lib.lib.klvae_trainer_get_note, self._live(), key)
            except KlvaeError as e:
                if default is _MISSING or e.status != Status.OPTION:
                    raise
                return default


# ---------------------------------------------------------------------------
# Images and options
# ---------------------------------------------------------------------------

def read_image(path) -> np.ndarray:
    """Reads a PNG or JPEG into a new float32 (3, h, w) array in [-1, 1]
    (klvae_image_read; the library's buffer is copied once and freed)."""
    cpath = _path(path)
    pixels = _float_p()
    h, w = c_int(), c_int()
    check(_lib.lib.klvae_image_read(cpath, byref(pixels), byref(h), byref(w)))
    try:
        out = np.empty((3, h.value, w.value), np.float32)
        ctypes.memmove(out.ctypes.data, pixels, out.nbytes)
    finally:
        _lib.lib.klvae_free(ctypes.cast(pixels, c_void_p))
    return out


def write_png(path, image) -> None:
    """Writes a (3, h, w) image in [-1, 1] (or a batch of one, (1, 3, h, w)) as an
    8-bit RGB PNG (klvae_image_write_png: round(255 * clamp(v / 2 + 0.5, 0, 1)))."""
    cpath = _path(path)
    arr = _float32(image, "image")
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3 or arr.shape[0] != 3 or arr.shape[1] <= 0 or arr.shape[2] <= 0:
        raise ValueError(f"image must be a (3, h, w) array (or (1, 3, h, w)); got shape {arr.shape}")
    if arr.shape[1] > 65536 or arr.shape[2] > 65536:
        raise ValueError(f"image is {arr.shape[1]} x {arr.shape[2]}; PNG sides are at most 65536")
    arr = _contiguous(arr)
    check(_lib.lib.klvae_image_write_png(cpath, _pointer(arr), arr.shape[1], arr.shape[2]))


def options() -> list:
    """Every option key the library accepts, in its order: a list of
    ``(key, default, help)`` (klvae_option_describe)."""
    result = []
    index = 0
    while True:
        key, default, help_ = c_char_p(), c_char_p(), c_char_p()
        status = _lib.lib.klvae_option_describe(index, byref(key), byref(default), byref(help_))
        if status == Status.INVALID_ARGUMENT:
            return result
        check(status)
        result.append((key.value.decode(), default.value.decode(), help_.value.decode()))
        index += 1
