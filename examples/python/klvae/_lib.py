"""Finding, loading and declaring libklvae (ctypes; no compiled extension).

The shared library is looked for, in this order:

1. the environment variable ``KLVAE_LIBRARY``: the full path of the .so
   (when it is set and cannot be loaded, that is an error: no fallback);
2. ``libklvae.so.0`` next to this package's files (a vendored copy);
3. the system search path: ``CDLL("libklvae.so.0")`` (which honours
   ``LD_LIBRARY_PATH``, the ld.so cache and the standard directories), then
   ``ctypes.util.find_library("klvae")``.

The library found must have the major version this module was written for
(``KLVAE_VERSION_MAJOR`` = 0) and at least its minor version (1), the rule of
``klvae_version`` in klvae.h; anything else raises :class:`LibraryError`, an
``ImportError``, naming the path and both versions.

The library is a ``ctypes.CDLL``: ctypes releases the GIL for the duration
of every foreign call, so other Python threads run while libklvae computes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import enum
import os
from ctypes import (POINTER, c_char_p, c_double, c_float, c_int, c_int32, c_int64, c_size_t,
                    c_uint, c_uint32, c_uint64, c_void_p)

# The version of klvae.h this module was written against.
VERSION_MAJOR = 0
VERSION_MINOR = 2
VERSION_PATCH = 0

SONAME = "libklvae.so.0"
ENV_VAR = "KLVAE_LIBRARY"


class LibraryError(ImportError):
    """libklvae could not be found or loaded, or has an incompatible version."""


class Status(enum.IntEnum):
    """``klvae_status_t``: the numbers are fixed and only ever appended to."""

    OK = 0
    INVALID_ARGUMENT = 1
    OUT_OF_MEMORY = 2
    IO = 3
    FORMAT = 4
    SHAPE = 5
    MISSING_TENSOR = 6
    CONFIG = 7
    OPTION = 8
    UNSUPPORTED = 9
    BACKEND_UNAVAILABLE = 10
    BACKEND = 11
    INTERNAL = 12
    NONFINITE = 13
    BUSY = 14
    BUFFER_TOO_SMALL = 15
    COMM = 16


class KlvaeError(Exception):
    """A libklvae call failed.

    ``status`` is the ``klvae_status_t`` value (an int; a :class:`Status`
    member when this module knows the number), ``status_name`` the library's
    ``klvae_status_string`` text ("invalid argument"), ``message`` the
    library's ``klvae_last_error`` text, read on the calling thread right
    after the failing call (it names the file, tensor, shape or option).
    """

    def __init__(self, status: int, message: str, status_name: str | None = None):
        try:
            status = Status(status)
        except ValueError:
            pass
        self.status = status
        self.status_name = status_name if status_name is not None else _status_string(status)
        self.message = message
        super().__init__(f"{message} ({self.status_name})" if message else self.status_name)

    def __reduce__(self):
        return (type(self), (int(self.status), self.message, self.status_name))


class StepStats(ctypes.Structure):
    """``klvae_step_stats_t``, field for field as in klvae.h."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("reserved", c_uint32),
        ("step", c_int64),
        ("total_loss", c_double),
        ("rec_loss", c_double),
        ("perceptual_loss", c_double),
        ("nll_loss", c_double),
        ("kl_loss", c_double),
        ("g_loss", c_double),
        ("d_weight", c_double),
        ("disc_factor", c_double),
        ("d_loss", c_double),
        ("logits_real", c_double),
        ("logits_fake", c_double),
        ("logvar", c_double),
        ("seconds", c_double),
        ("skipped", c_uint32),
        ("spare", c_uint32),
        ("skipped_steps", c_int64),
    ]


# ``klvae_allreduce_sum`` and ``klvae_broadcast`` of ``klvae_comm_t``: the
# callbacks of a data-parallel communicator (klvae.h, "Data-parallel training").
ALLREDUCE_SUM_FN = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t, c_int)
BROADCAST_FN = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t, c_int)


class Comm(ctypes.Structure):
    """``klvae_comm_t``, field for field as in klvae.h."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("rank", c_int),
        ("size", c_int),
        ("ctx", c_void_p),
        ("allreduce_sum", ALLREDUCE_SUM_FN),
        ("broadcast", BROADCAST_FN),
    ]


# The fields a step reports (struct_size and reserved are the protocol).
STEP_STATS_FIELDS = tuple(name for name, _ in StepStats._fields_[2:])


class DatasetProgress(ctypes.Structure):
    """``klvae_dataset_progress_t``, field for field as in klvae.h."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("reserved", c_uint32),
        ("part", c_int32),
        ("parts", c_int32),
        ("images_total", c_int64),
        ("images_done", c_int64),
        ("images_skipped", c_int64),
        ("images_resumed", c_int64),
        ("shards_total", c_int64),
        ("shards_done", c_int64),
        ("seconds", c_double),
        ("images_per_second", c_double),
        ("eta_seconds", c_double),
        ("skipped_path", c_char_p),
        ("skipped_reason", c_char_p),
        ("finished", c_int32),
        ("dataset_complete", c_int32),
    ]


# klvae_dataset_progress_fn
PROGRESS_FN = ctypes.CFUNCTYPE(c_int, c_void_p, POINTER(DatasetProgress))

_float_p = POINTER(c_float)
_status = c_int  # klvae_status_t: an enum, int-sized on every ABI the library builds for

# name: (restype, argtypes). Every function the package calls is declared.
_PROTOTYPES = {
    "klvae_version": (c_uint, []),
    "klvae_version_string": (c_char_p, []),
    "klvae_status_string": (c_char_p, [_status]),
    "klvae_last_error": (c_char_p, []),
    "klvae_last_needed_size": (c_size_t, []),
    "klvae_free": (None, [c_void_p]),
    "klvae_options_create": (_status, [POINTER(c_void_p)]),
    "klvae_options_set": (_status, [c_void_p, c_char_p, c_char_p]),
    "klvae_options_free": (None, [c_void_p]),
    "klvae_option_describe": (_status, [c_int, POINTER(c_char_p), POINTER(c_char_p), POINTER(c_char_p)]),
    "klvae_model_load": (_status, [c_char_p, c_void_p, POINTER(c_void_p)]),
    "klvae_model_create": (_status, [c_void_p, POINTER(c_void_p)]),
    "klvae_model_save": (_status, [c_void_p, c_char_p]),
    "klvae_model_free": (None, [c_void_p]),
    "klvae_model_in_channels": (c_int, [c_void_p]),
    "klvae_model_out_channels": (c_int, [c_void_p]),
    "klvae_model_latent_channels": (c_int, [c_void_p]),
    "klvae_model_downsampling_factor": (c_int, [c_void_p]),
    "klvae_model_scaling_factor": (c_float, [c_void_p]),
    "klvae_model_shift_factor": (c_float, [c_void_p]),
    "klvae_model_parameter_count": (c_int64, [c_void_p]),
    "klvae_model_backend": (c_char_p, [c_void_p]),
    "klvae_model_get": (_status, [c_void_p, c_char_p, c_char_p, c_size_t]),
    "klvae_encode": (_status, [c_void_p, _float_p, c_int, c_int, c_int, _float_p, _float_p]),
    "klvae_sample": (_status, [c_void_p, _float_p, _float_p, c_int, c_int, c_int, c_uint64, _float_p]),
    "klvae_decode": (_status, [c_void_p, _float_p, c_int, c_int, c_int, _float_p]),
    "klvae_trainer_create": (_status, [c_void_p, c_void_p, POINTER(c_void_p)]),
    "klvae_trainer_step": (_status, [c_void_p, _float_p, c_int, c_int, c_int, POINTER(StepStats)]),
    "klvae_trainer_save": (_status, [c_void_p, c_char_p]),
    "klvae_trainer_load": (_status, [c_void_p, c_char_p]),
    "klvae_trainer_export": (_status, [c_void_p, c_char_p, c_int]),
    "klvae_trainer_step_count": (c_int64, [c_void_p]),
    "klvae_trainer_get": (_status, [c_void_p, c_char_p, c_char_p, c_size_t]),
    "klvae_trainer_set_note": (_status, [c_void_p, c_char_p, c_char_p]),
    "klvae_trainer_get_note": (_status, [c_void_p, c_char_p, c_char_p, c_size_t]),
    "klvae_trainer_free": (None, [c_void_p]),
    "klvae_trainer_set_comm": (_status, [c_void_p, POINTER(Comm)]),
    "klvae_image_read": (_status, [c_char_p, POINTER(_float_p), POINTER(c_int), POINTER(c_int)]),
    "klvae_image_read_opts": (_status, [c_char_p, c_void_p, POINTER(_float_p), POINTER(c_int),
                                        POINTER(c_int)]),
    "klvae_image_write_png": (_status, [c_char_p, _float_p, c_int, c_int]),
    "klvae_encode_dataset": (_status, [c_void_p, c_char_p, c_char_p, c_void_p, PROGRESS_FN,
                                       c_void_p, POINTER(DatasetProgress)]),
    "klvae_latent_stats": (_status, [c_char_p, c_int, POINTER(c_int), POINTER(c_double),
                                     POINTER(c_double), POINTER(c_double), POINTER(c_double)]),
}


def _candidates():
    """Yields (path_or_name, how_found, must_load) in the documented order."""
    env = os.environ.get(ENV_VAR)
    if env:
        yield env, f"${ENV_VAR}", True
        return
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), SONAME)
    if os.path.exists(here):
        yield here, "next to the package", True
        return
    yield SONAME, "the system search path", False
    found = ctypes.util.find_library("klvae")
    if found and found != SONAME:
        yield found, "ctypes.util.find_library", False


def _check_version(lib, where: str) -> None:
    try:
        fn = lib.klvae_version
    except AttributeError:
        raise LibraryError(f"{where} is not libklvae: it has no klvae_version symbol") from None
    fn.restype, fn.argtypes = c_uint, []
    found = int(fn())
    major, minor, patch = found // 10000, found // 100 % 100, found % 100
    wanted = f"{VERSION_MAJOR}.{VERSION_MINOR}.{VERSION_PATCH}"
    if major != VERSION_MAJOR or minor < VERSION_MINOR:
        raise LibraryError(
            f"{where} is libklvae {major}.{minor}.{patch} (klvae_version() = {found}); this "
            f"Python module was written for libklvae {wanted} and needs major version "
            f"{VERSION_MAJOR}, minor at least {VERSION_MINOR}")


def _declare(lib, where: str) -> None:
    for name, (restype, argtypes) in _PROTOTYPES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise LibraryError(f"{where} lacks the function {name}") from None
        fn.restype = restype
        fn.argtypes = argtypes


def load_library():
    """Finds, loads, version-checks and declares libklvae; returns (CDLL, path)."""
    tried = []
    for name, how, must in _candidates():
        try:
            lib = ctypes.CDLL(name)
        except OSError as e:
            if must:
                raise LibraryError(f"cannot load libklvae from {name} (found via {how}): {e}") from None
            tried.append(f"{name} ({how}): {e}")
            continue
        path = _loaded_path(lib, name)
        where = f"{path} (found via {how})"
        _check_version(lib, where)
        _declare(lib, where)
        return lib, path
    raise LibraryError(
        "cannot find libklvae: set KLVAE_LIBRARY to the full path of libklvae.so.0, put "
        "libklvae.so.0 next to the klvae package, or install it where the dynamic loader "
        "finds it (make install, ldconfig). Tried: " + "; ".join(tried))


def _loaded_path(lib, name: str) -> str:
    """The file the loader actually opened for lib (falls back to name)."""
    if os.sep in name:
        return os.path.abspath(name)
    try:  # glibc: dlinfo(RTLD_DI_LINKMAP) gives the link map, whose l_name is the path
        libdl = ctypes.CDLL(None)
        dlinfo = libdl.dlinfo
    except (OSError, AttributeError):
        return name

    class _LinkMap(ctypes.Structure):
        _fields_ = [("l_addr", c_void_p), ("l_name", c_char_p)]

    dlinfo.restype, dlinfo.argtypes = c_int, [c_void_p, c_int, c_void_p]
    lm = POINTER(_LinkMap)()
    RTLD_DI_LINKMAP = 2
    if dlinfo(lib._handle, RTLD_DI_LINKMAP, ctypes.byref(lm)) == 0 and lm and lm.contents.l_name:
        return os.fsdecode(lm.contents.l_name)
    return name


lib, library_path = load_library()


def _status_string(status: int) -> str:
    return lib.klvae_status_string(int(status)).decode("utf-8", "replace")


def check(status: int) -> None:
    """Raises KlvaeError for a failed call; reads klvae_last_error on this thread."""
    if status != 0:
        message = lib.klvae_last_error().decode("utf-8", "replace")
        raise KlvaeError(status, message)

