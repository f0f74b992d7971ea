"""Tests of the klvae Python bindings.

Run from the repository root after `make`:

    KLVAE_LIBRARY=$PWD/lib/libklvae.so.0 python3 -m pytest examples/python/tests -q

Without KLVAE_LIBRARY the tests use the repository's lib/libklvae.so.0. The
references are the C side's own results: the diffusers fixtures the C tests use
(tests/fixtures/*/io.safetensors), the `klvae` tool's latent files and PNGs
(bin/klvae), and the PyTorch training reference (tests/fixtures/train).
"""
from __future__ import annotations

import array
import copy
import gc
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
PACKAGE_SRC = HERE.parent                      # examples/python
ROOT = PACKAGE_SRC.parent.parent               # the repository
FIXTURES = ROOT / "tests" / "fixtures"
TRAIN = FIXTURES / "train"
CLI = ROOT / "bin" / "klvae"

# The references (bit-for-bit resume, the tool's files) are CPU results: with backend
# "auto" a machine with the CUDA plugin would otherwise compute on the GPU.
os.environ.setdefault("KLVAE_BACKEND", "cpu")
if not os.environ.get("KLVAE_LIBRARY") and (ROOT / "lib" / "libklvae.so.0").exists():
    os.environ["KLVAE_LIBRARY"] = str(ROOT / "lib" / "libklvae.so.0")
LIB = os.environ.get("KLVAE_LIBRARY", "")
sys.path.insert(0, str(PACKAGE_SRC))

import klvae  # noqa: E402
from klvae import KlvaeError, Model, Status, Trainer  # noqa: E402

FIXTURE_CONFIGS = ["noquant", "latent16", "noattn", "gelu"]
# what a single file cannot show, as the fixture configs have it (tests/test_model.c)
FILE_OPTIONS = {"latent16": dict(norm_num_groups=8), "noquant": dict(norm_num_groups=4),
                "noattn": dict(norm_num_groups=4), "gelu": dict(norm_num_groups=8, act_fn="gelu")}
PARITY = 1e-4  # the C tests' bound against diffusers


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

_ST_DTYPES = {"F32": "<f4", "F64": "<f8", "F16": "<f2", "I64": "<i8", "I32": "<i4"}


def read_safetensors(path):
    """A minimal safetensors reader: (tensors as numpy arrays, metadata)."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    base = 8 + n
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        arr = np.frombuffer(data[base + begin:base + end], dtype=_ST_DTYPES[info["dtype"]])
        out[name] = arr.reshape(info["shape"]).astype(np.float32 if info["dtype"] != "F64" else np.float64)
    return out, meta


def load_fixture(config, file="diffusers", threads=1):
    options = dict(threads=threads)
    if file != "diffusers":
        options.update(FILE_OPTIONS[config])
    return Model.load(FIXTURES / config / file, **options)


def rand(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(dtype)


def run_python(code, env=None, cwd=None, drop=()):
    """Runs code in a fresh interpreter (for library discovery, which happens at import)."""
    e = dict(os.environ)
    for key in drop:
        e.pop(key, None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=e, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def pointer_of(obj):
    """The address of a ctypes float pointer passed to a spied C function."""
    import ctypes
    return ctypes.cast(obj, ctypes.c_void_p).value


def data_address(arr):
    return np.asarray(arr).__array_interface__["data"][0]


@pytest.fixture
def spy(monkeypatch):
    """spy(name) replaces klvae's CDLL function `name` with a recorder that calls through."""
    calls = {}

    def install(name, forbid=False):
        original = getattr(klvae._lib.lib, name)
        calls[name] = []

        def recorder(*args):
            if forbid:
                raise AssertionError(f"{name} must not be called")
            calls[name].append(args)
            return original(*args)

        monkeypatch.setattr(klvae._lib.lib, name, recorder)
        return calls[name]

    return install


@pytest.fixture(scope="module")
def noquant():
    with load_fixture("noquant") as m:
        yield m


@pytest.fixture
def tiny():
    with Model.create(config="tiny", seed=1, threads=1) as m:
        yield m


# ---------------------------------------------------------------------------
# the library and its discovery
# ---------------------------------------------------------------------------

def test_library_version_and_path():
    assert klvae.__version__ == "0.2.0"
    assert klvae.library_version_number // 10000 == 0
    assert klvae.library_version == "%d.%d.%d" % (klvae.library_version_number // 10000,
                                                   klvae.library_version_number // 100 % 100,
                                                   klvae.library_version_number % 100)
    assert os.path.realpath(klvae.library_path) == os.path.realpath(LIB)


def test_status_names_come_from_the_library():
    lib = klvae._lib.lib
    for status in Status:
        assert KlvaeError(int(status), "m").status_name == lib.klvae_status_string(int(status)).decode()
    assert KlvaeError(99, "m").status_name == "unknown status"
    assert KlvaeError(99, "m").status == 99
    assert KlvaeError(3, "").status is Status.IO


def test_env_var_pointing_nowhere_is_an_import_error(tmp_path):
    missing = tmp_path / "nowhere" / "libklvae.so.0"
    r = run_python("import klvae", env={"KLVAE_LIBRARY": str(missing), "PYTHONPATH": str(PACKAGE_SRC)})
    assert r.returncode != 0
    assert "LibraryError" in r.stderr and str(missing) in r.stderr and "KLVAE_LIBRARY" in r.stderr
    r = run_python("""
        try:
            import klvae
        except ImportError as e:
            print(type(e).__name__, 'is an ImportError')
        """, env={"KLVAE_LIBRARY": str(missing), "PYTHONPATH": str(PACKAGE_SRC)})
    assert r.stdout.strip() == "LibraryError is an ImportError", r.stderr


@pytest.fixture(scope="module")
def fake_libraries(tmp_path_factory):
    """Tiny shared libraries that pretend to be libklvae (wrong version, missing symbols)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("fake")
    src = d / "fake.c"
    src.write_text("unsigned klvae_version(void) { return VERSION; }\n")
    libs = {}
    for name, version in [("major1", 10100), ("minor0", 5), ("symbols", 200)]:
        out = d / name / "libklvae.so.0"
        out.parent.mkdir()
        subprocess.run([cc, "-shared", "-fPIC", f"-DVERSION={version}", str(src), "-o", str(out)],
                       check=True)
        libs[name] = out
    other = d / "other.c"
    other.write_text("int not_klvae(void) { return 0; }\n")
    out = d / "other" / "libklvae.so.0"
    out.parent.mkdir()
    subprocess.run([cc, "-shared", "-fPIC", str(other), "-o", str(out)], check=True)
    libs["other"] = out
    return libs


@pytest.mark.parametrize("which, expected", [
    ("major1", ["is libklvae 1.1.0", "klvae_version() = 10100", "written for libklvae 0.2.0"]),
    ("minor0", ["is libklvae 0.0.5", "written for libklvae 0.2.0", "minor at least 2"]),
    ("symbols", ["lacks the function klvae_version_string"]),
    ("other", ["is not libklvae"]),
])
def test_incompatible_library_is_refused(fake_libraries, which, expected):
    path = fake_libraries[which]
    r = run_python("import klvae", env={"KLVAE_LIBRARY": str(path), "PYTHONPATH": str(PACKAGE_SRC)})
    assert r.returncode != 0
    assert "klvae._lib.LibraryError" in r.stderr
    assert str(path) in r.stderr
    for text in expected:
        assert text in r.stderr, r.stderr


def test_system_search_path_is_used_without_env_var(tmp_path):
    if (PACKAGE_SRC / "klvae" / "libklvae.so.0").exists():
        pytest.skip("a vendored klvae/libklvae.so.0 comes before the search path")
    r = run_python("import klvae; print(klvae.library_path)", cwd=tmp_path,
                   env={"PYTHONPATH": str(PACKAGE_SRC), "LD_LIBRARY_PATH": os.path.dirname(LIB)},
                   drop=["KLVAE_LIBRARY"])
    assert r.returncode == 0, r.stderr
    assert os.path.realpath(r.stdout.strip()) == os.path.realpath(LIB)


def test_pip_install_target_and_vendored_library(tmp_path):
    """pip installs the package; it imports from there with KLVAE_LIBRARY, and finds
    a libklvae.so.0 placed next to its files without it."""
    # an offline build (--no-build-isolation) needs setuptools >= 61 (pyproject metadata)
    # and, before setuptools 70.1, the wheel package
    probe_tools = run_python("""
        import setuptools, pip
        v = tuple(int(p) for p in setuptools.__version__.split(".")[:2])
        if v < (61, 0): raise SystemExit("setuptools %s is older than 61" % setuptools.__version__)
        if v < (70, 1): import wheel
        """)
    if probe_tools.returncode != 0:
        pytest.skip("pip install needs pip, setuptools >= 61 and wheel: "
                    + (probe_tools.stderr.strip().splitlines() or ["?"])[-1])
    src = tmp_path / "src"  # pip may write build/ and *.egg-info into the source tree
    shutil.copytree(PACKAGE_SRC, src, ignore=shutil.ignore_patterns(
        "tests", "build", "*.egg-info", "__pycache__", ".pytest_cache", "libklvae.so*"))
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                        "--no-index", "--disable-pip-version-check", "-q", "--target", str(target),
                        str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (target / "klvae" / "__init__.py").exists()
    dist = list(target.glob("klvae-0.2.0.dist-info"))
    assert dist, list(target.iterdir())
    assert "Requires-Dist: numpy" in (dist[0] / "METADATA").read_text()
    probe = """
        import klvae, numpy as np
        print(klvae.__file__)
        print(klvae.library_path)
        with klvae.Model.create(config="tiny", seed=1, threads=1) as m:
            mean, logvar = m.encode(np.zeros((1, 3, 8, 8), np.float32))
            print(mean.shape)
        """
    env = {"PYTHONPATH": str(target)}
    r = run_python(probe, env=dict(env, KLVAE_LIBRARY=LIB), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    file, path, shape = r.stdout.split("\n")[:3]
    assert target.resolve() in Path(file).resolve().parents
    assert os.path.realpath(path) == os.path.realpath(LIB)
    assert shape == "(1, 4, 4, 4)"
    # vendored: a copy of the library next to the package's files, no KLVAE_LIBRARY
    vendored = target / "klvae" / "libklvae.so.0"
    shutil.copy(os.path.realpath(LIB), vendored)
    r = run_python(probe, env=dict(env, LD_LIBRARY_PATH=os.path.dirname(LIB)), cwd=tmp_path,
                   drop=["KLVAE_LIBRARY"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[1] == str(vendored)
    # KLVAE_LIBRARY still comes first
    r = run_python(probe, env=dict(env, KLVAE_LIBRARY=LIB), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert os.path.realpath(r.stdout.split("\n")[1]) == os.path.realpath(LIB)


def test_every_called_function_is_declared():
    source = (PACKAGE_SRC / "klvae" / "_api.py").read_text() + (PACKAGE_SRC / "klvae" / "__init__.py").read_text()
    used = set(re.findall(r"\b(klvae_[a-z_0-9]+)\(", source)) | set(re.findall(r"\.(klvae_[a-z_0-9]+)\b", source))
    declared = set(klvae._lib._PROTOTYPES)
    assert used <= declared, used - declared
    for name in declared:
        fn = getattr(klvae._lib.lib, name)
        assert fn.argtypes is not None, name
    # each declaration agrees with klvae.h in name and number of arguments
    header = (ROOT / "include" / "klvae.h").read_text()
    prototypes = {name: params for name, params in re.findall(
        r"^KLVAE_API[^(;]*?\b(klvae_\w+)\(([^)]*)\);", header, re.M)}
    for name in declared:
        assert name in prototypes, f"{name} is not in klvae.h"
        params = prototypes[name].strip()
        count = 0 if params == "void" else params.count(",") + 1
        assert len(getattr(klvae._lib.lib, name).argtypes) == count, name


def test_step_stats_structure_matches_the_header(tmp_path):
    """Same fields, types, offsets and size as the C compiler gives klvae_step_stats_t."""
    import ctypes
    header = (ROOT / "include" / "klvae.h").read_text()
    body = header[header.index("typedef struct klvae_step_stats {"):]
    body = body[:body.index("} klvae_step_stats_t;")]
    fields = re.findall(r"^\s*(uint32_t|int64_t|double)\s+([a-z_]+);", body, re.M)
    types = {"uint32_t": ctypes.c_uint32, "int64_t": ctypes.c_int64, "double": ctypes.c_double}
    S = klvae._lib.StepStats
    assert [(n, types[t]) for t, n in fields] == [(n, t) for n, t in S._fields_]
    assert klvae.STEP_STATS_FIELDS == tuple(n for _, n in fields[2:])
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler for the layout check")
    prog = tmp_path / "layout.c"
    prog.write_text("#include <stdio.h>\n#include <stddef.h>\n#include <klvae.h>\nint main(void) {\n"
                    + "".join(f'    printf("{n} %zu\\n", offsetof(klvae_step_stats_t, {n}));\n' for _, n in fields)
                    + '    printf("sizeof %zu\\n", sizeof(klvae_step_stats_t));\n    return 0;\n}\n')
    subprocess.run([cc, "-std=c11", "-I", str(ROOT / "include"), str(prog), "-o", str(tmp_path / "layout")],
                   check=True)
    out = subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True, check=True).stdout
    c_layout = dict(line.split() for line in out.splitlines())
    for name, _ in S._fields_:
        assert int(c_layout[name]) == getattr(S, name).offset, name
    assert int(c_layout["sizeof"]) == ctypes.sizeof(S)


def test_options_lists_the_library_keys():
    opts = klvae.options()
    keys = [k for k, _, _ in opts]
    assert keys[:2] == ["backend", "device"] and "learning_rate" in keys and "grad_clip" in keys
    assert dict((k, d) for k, d, _ in opts)["block_out_channels"] == "128,256,512,512"
    cli = subprocess.run([str(CLI), "options"], capture_output=True, text=True).stdout if CLI.exists() else None
    if cli:
        assert [line.split()[0][2:] for line in cli.splitlines() if line.startswith("--")] == keys


# ---------------------------------------------------------------------------
# models: loading, config, options
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("config", FIXTURE_CONFIGS)
def test_config_properties_match_config_json(config):
    cfg = json.loads((FIXTURES / config / "diffusers" / "config.json").read_text())
    with load_fixture(config) as m:
        assert m.in_channels == cfg["in_channels"]
        assert m.out_channels == cfg["out_channels"]
        assert m.latent_channels == cfg["latent_channels"]
        assert m.downsampling_factor == 2 ** (len(cfg["block_out_channels"]) - 1)
        assert m.scaling_factor == cfg["scaling_factor"]
        assert m.shift_factor == (cfg["shift_factor"] or 0.0)
        assert m.backend == m.get("backend") == os.environ["KLVAE_BACKEND"]
        assert isinstance(m.parameter_count, int) and m.parameter_count > 0
        assert m.get("block_out_channels") == ",".join(map(str, cfg["block_out_channels"]))
        assert m.get("block-out-channels") == m.get("block_out_channels")
        assert m.get("act_fn") == cfg["act_fn"]
        assert m.get("shift_factor") == ("none" if cfg["shift_factor"] is None else str(cfg["shift_factor"]))
        assert m.get("threads") == "1"
        assert "parameters=" in repr(m)


def test_create_tiny_and_option_value_conversion():
    with Model.create(config="tiny", seed=1, threads=1) as m:
        assert m.get("block_out_channels") == "16,32" and m.downsampling_factor == 2
        assert m.parameter_count == 167959
    with Model.create(config="tiny", block_out_channels=[8, 16, 16], norm_num_groups=4,
                      use_quant_conv=False, mid_block_add_attention=True, shift_factor=None,
                      scaling_factor=0.5, latent_channels=np.int64(3), threads=1) as m:
        assert m.get("block_out_channels") == "8,16,16" and m.downsampling_factor == 4
        assert m.get("use_quant_conv") == "false"
        assert m.get("mid_block_add_attention") == "true"
        assert m.get("shift_factor") == "none" and m.shift_factor == 0.0
        assert m.scaling_factor == 0.5 and m.latent_channels == 3
    with Model.create(config="tiny", shift_factor=0.25, threads=1) as m:
        assert m.shift_factor == 0.25


def test_seeded_creation_is_deterministic():
    x = rand((1, 3, 16, 16))
    with Model.create(config="tiny", seed=1, threads=1) as a, \
         Model.create(config="tiny", seed=1, threads=2) as b, \
         Model.create(config="tiny", seed=2, threads=1) as c:
        assert np.array_equal(a.encode(x)[0], b.encode(x)[0])
        assert not np.array_equal(a.encode(x)[0], c.encode(x)[0])


def test_save_and_load_round_trip(tmp_path, tiny):
    tiny.save(tmp_path / "m")
    assert (tmp_path / "m" / "config.json").exists()
    x = rand((2, 3, 16, 24))
    with Model.load(tmp_path / "m", threads=1) as back:
        assert back.get("block_out_channels") == "16,32"
        for a, b in zip(tiny.encode(x), back.encode(x)):
            assert np.array_equal(a, b)
    with Model.load(str(tmp_path / "m").encode(), threads=1) as back:  # bytes paths work too
        assert back.parameter_count == tiny.parameter_count


# ---------------------------------------------------------------------------
# inference against the C side's results
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("config, file", [(c, "diffusers") for c in FIXTURE_CONFIGS] + [
    ("gelu", "compvis.safetensors"), ("latent16", "bf16.safetensors"),
    ("noquant", "legacy.safetensors"), ("noattn", "fp16.safetensors")])
def test_encode_decode_match_the_diffusers_fixtures(config, file):
    io, _ = read_safetensors(FIXTURES / config / "io.safetensors")
    with load_fixture(config, file) as m:
        mean, logvar = m.encode(io["x"])
        decoded = m.decode(io["mean"])
    assert mean.shape == io["mean"].shape and decoded.shape == io["decoded"].shape
    assert np.abs(mean - io["mean"]).max() <= PARITY
    assert np.abs(logvar - io["logvar"]).max() <= PARITY
    assert np.abs(decoded - io["decoded"]).max() <= PARITY


def _cli(*args):
    r = subprocess.run([str(CLI), *map(str, args), "-q", "--threads", "1"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


needs_cli = pytest.mark.skipif(not CLI.exists(), reason="bin/klvae not built")


@needs_cli
@pytest.mark.parametrize("config", ["noquant", "latent16"])
def test_matches_the_klvae_tool(tmp_path, config):
    """klvae encode / encode --sample / decode on a PNG, bit for bit against Python."""
    model_dir = FIXTURES / config / "diffusers"
    png = tmp_path / "in.png"
    klvae.write_png(png, rand((3, 37, 45), seed=3))  # not a multiple of f: the tool pads
    _cli("encode", model_dir, png, tmp_path / "mean.safetensors")
    _cli("encode", model_dir, png, tmp_path / "z.safetensors", "--sample", "--seed", "7")
    _cli("decode", model_dir, tmp_path / "z.safetensors", tmp_path / "cli.png")
    tool, meta = read_safetensors(tmp_path / "mean.safetensors")
    drawn, drawn_meta = read_safetensors(tmp_path / "z.safetensors")
    assert meta["image_height"] == "37" and meta["image_width"] == "45"
    assert drawn_meta["latent"] == "sample seed 7"

    with load_fixture(config) as m:
        f = m.downsampling_factor
        image = klvae.read_image(png)
        assert image.shape == (3, 37, 45)
        ph, pw = -37 % f, -45 % f  # the tool's padding repeats the last row and column
        padded = np.pad(image, ((0, 0), (0, ph), (0, pw)), mode="edge")
        mean, logvar = m.encode(padded)
        assert np.array_equal(mean, tool["mean"])
        assert np.array_equal(logvar, tool["logvar"])
        assert np.array_equal(mean, tool["latent"])
        z = m.sample(mean, logvar, seed=7)
        assert np.array_equal(z, drawn["latent"])
        decoded = m.decode(z)[:, :, :37, :45]  # the tool crops back to the image size
    klvae.write_png(tmp_path / "py.png", decoded)
    assert np.array_equal(klvae.read_image(tmp_path / "py.png"), klvae.read_image(tmp_path / "cli.png"))
    assert (tmp_path / "py.png").read_bytes() == (tmp_path / "cli.png").read_bytes()


def test_three_d_input_is_a_batch_of_one(noquant):
    x = rand((3, 16, 24))
    mean, logvar = noquant.encode(x)
    assert mean.shape == (1, 4, 2, 3)
    mean4, logvar4 = noquant.encode(x[np.newaxis])
    assert np.array_equal(mean, mean4) and np.array_equal(logvar, logvar4)
    z = noquant.sample(mean[0], logvar[0], seed=1)
    assert z.shape == (1, 4, 2, 3) and np.array_equal(z, noquant.sample(mean, logvar, seed=1))
    assert noquant.decode(mean[0]).shape == (1, 3, 16, 24)


def test_batch_items_are_independent(noquant):
    x = rand((3, 3, 16, 16), seed=4)
    mean, logvar = noquant.encode(x)
    for i in range(3):
        m1, l1 = noquant.encode(x[i])
        assert np.array_equal(m1[0], mean[i]) and np.array_equal(l1[0], logvar[i])
    assert np.array_equal(noquant.decode(mean)[1], noquant.decode(mean[1])[0])


def test_outputs_are_new_float32_arrays(noquant):
    x = rand((2, 3, 16, 16))
    mean, logvar = noquant.encode(x)
    z = noquant.sample(mean, logvar, 0)
    y = noquant.decode(z)
    for out in (mean, logvar, z, y):
        assert out.dtype == np.float32 and out.flags.c_contiguous and out.flags.writeable
        assert out.flags.owndata
    assert not np.shares_memory(mean, logvar) and not np.shares_memory(z, mean)
    assert y.shape == (2, 3, 16, 16)


def test_sample_is_deterministic_per_seed(noquant):
    mean, logvar = noquant.encode(rand((2, 3, 32, 32)))
    a = noquant.sample(mean, logvar, seed=7)
    assert np.array_equal(a, noquant.sample(mean, logvar, seed=7))
    assert np.array_equal(a, noquant.sample(mean, logvar, seed=np.uint64(7)))
    b = noquant.sample(mean, logvar, seed=8)
    assert not np.array_equal(a, b) and not np.any(a == b)
    big = noquant.sample(mean, logvar, seed=2**64 - 1)
    assert np.isfinite(big).all() and not np.array_equal(big, a)
    # z = mean + std * eps with eps ~ N(0, 1)
    zeros = np.zeros((4, 4, 32, 32), np.float32)
    eps = noquant.sample(zeros, zeros, seed=1)
    assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05
    shifted = noquant.sample(zeros + 3, zeros + np.log(4, dtype=np.float32), seed=1)
    np.testing.assert_allclose(shifted, 3 + 2 * eps, rtol=0, atol=1e-5)
    # element i depends on seed and i only
    assert np.array_equal(noquant.sample(zeros[:1], zeros[:1], seed=1)[0], eps[0])


@pytest.mark.parametrize("seed, error", [(-1, ValueError), (2**64, ValueError), (1.5, TypeError),
                                         ("7", TypeError), (None, TypeError)])
def test_bad_seeds(noquant, seed, error, spy):
    spy("klvae_sample", forbid=True)
    z = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(error, match="seed"):
        noquant.sample(z, z, seed)


# ---------------------------------------------------------------------------
# buffers: no copy for float32 C-contiguous, one explicit conversion otherwise
# ---------------------------------------------------------------------------

def test_contiguous_float32_is_passed_without_copy(noquant, spy):
    calls = spy("klvae_encode")
    x = rand((2, 3, 16, 16))
    expected = noquant.encode(x)
    assert pointer_of(calls[-1][1]) == data_address(x)
    # read-only arrays too
    ro = x.copy()
    ro.setflags(write=False)
    noquant.encode(ro)
    assert pointer_of(calls[-1][1]) == data_address(ro)
    # a memoryview: numpy wraps it without copying
    mv = memoryview(x)
    got = noquant.encode(mv)
    assert pointer_of(calls[-1][1]) == data_address(x)
    assert np.array_equal(got[0], expected[0])
    # an array.array of floats, shaped through np.frombuffer (a view, no copy)
    buf = array.array("f", x.ravel().tolist())
    view = np.frombuffer(buf, dtype=np.float32).reshape(x.shape)
    assert np.shares_memory(view, np.frombuffer(buf, dtype=np.float32))
    got = noquant.encode(view)
    assert pointer_of(calls[-1][1]) == buf.buffer_info()[0]
    assert np.array_equal(got[0], expected[0])
    # a 3-D array gets its batch dimension as a view
    noquant.encode(x[0])
    assert pointer_of(calls[-1][1]) == data_address(x)
    # a C-contiguous slice of a batch is a view too
    noquant.encode(x[1:])
    assert pointer_of(calls[-1][1]) == data_address(x) + x[0].nbytes


def test_sample_and_decode_pass_pointers_without_copy(noquant, spy):
    mean, logvar = noquant.encode(rand((1, 3, 16, 16)))
    sample_calls, decode_calls = spy("klvae_sample"), spy("klvae_decode")
    z = noquant.sample(mean, logvar, 1)
    assert pointer_of(sample_calls[-1][1]) == data_address(mean)
    assert pointer_of(sample_calls[-1][2]) == data_address(logvar)
    assert pointer_of(sample_calls[-1][7]) == data_address(z)
    y = noquant.decode(z)
    assert pointer_of(decode_calls[-1][1]) == data_address(z)
    assert pointer_of(decode_calls[-1][5]) == data_address(y)


@pytest.mark.parametrize("make, same_values", [
    (lambda x: x.astype(np.float64), True),                      # another dtype
    (lambda x: np.asfortranarray(x), True),                      # Fortran order
    (lambda x: np.repeat(x, 2, axis=3)[..., ::2], True),         # strided, not contiguous
    (lambda x: x.astype(">f4"), True),                           # big-endian float32
    (lambda x: x.tolist(), True),                                # a nested list
    (lambda x: np.round(x * 100).astype(np.int16), False),       # integers
], ids=["float64", "fortran", "strided", "big-endian", "list", "int16"])
def test_other_layouts_are_converted_once(noquant, spy, make, same_values):
    x = rand((2, 3, 16, 16))
    source = make(x)
    want = x if same_values else np.asarray(source).astype(np.float32)
    ref_mean, ref_logvar = noquant.encode(want)
    calls = spy("klvae_encode")
    mean, logvar = noquant.encode(source)
    if isinstance(source, np.ndarray):
        assert pointer_of(calls[-1][1]) != data_address(source)
    assert np.array_equal(mean, ref_mean) and np.array_equal(logvar, ref_logvar)


def test_unaligned_float32_is_converted(noquant, spy):
    x = rand((1, 3, 16, 16))
    raw = bytearray(x.nbytes + 1)
    unaligned = np.frombuffer(raw, dtype=np.float32, count=x.size, offset=1).reshape(x.shape)
    unaligned[...] = x
    assert not unaligned.flags.aligned
    calls = spy("klvae_encode")
    mean, _ = noquant.encode(unaligned)
    assert pointer_of(calls[-1][1]) != data_address(unaligned)
    assert np.array_equal(mean, noquant.encode(x)[0])


@pytest.mark.parametrize("bad", [np.zeros((1, 3, 8, 8), np.complex64), np.zeros((1, 3, 8, 8), bool),
                                 np.array([["a"]]), None, object()])
def test_non_numeric_inputs_are_type_errors(noquant, spy, bad):
    spy("klvae_encode", forbid=True)
    with pytest.raises(TypeError, match="real numbers"):
        noquant.encode(bad)


# ---------------------------------------------------------------------------
# shapes are checked before C is called
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape, message", [
    ((16, 16), r"must be a 4-D array \(n, 3, h, w\) or a 3-D array \(3, h, w\); got shape \(16, 16\)"),
    ((1, 1, 3, 16, 16), "got shape"),
    ((1, 4, 16, 16), r"images have 4 channels \(shape \(1, 4, 16, 16\)\); this model takes 3"),
    ((1, 3, 12, 16), r"images are 12 x 16 .* multiples of the downsampling factor 8"),
    ((1, 3, 16, 20), r"images are 16 x 20"),
    ((0, 3, 16, 16), "empty dimension"),
    ((1, 3, 0, 16), "empty dimension"),
])
def test_encode_shape_errors(noquant, spy, shape, message):
    spy("klvae_encode", forbid=True)
    with pytest.raises(ValueError, match=message):
        noquant.encode(np.zeros(shape, np.float32))


def test_sample_and_decode_shape_errors(noquant, spy):
    spy("klvae_sample", forbid=True)
    spy("klvae_decode", forbid=True)
    z = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError, match=r"mean has 3 channels .* latents have 4"):
        noquant.sample(np.zeros((1, 3, 2, 2), np.float32), z, 0)
    with pytest.raises(ValueError, match=r"mean and logvar differ in shape: \(1, 4, 2, 2\) and \(1, 4, 2, 3\)"):
        noquant.sample(z, np.zeros((1, 4, 2, 3), np.float32), 0)
    with pytest.raises(ValueError, match=r"z has 16 channels"):
        noquant.decode(np.zeros((1, 16, 2, 2), np.float32))
    with pytest.raises(ValueError, match="4-D"):
        noquant.decode(np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="too large"):
        noquant.decode(np.lib.stride_tricks.as_strided(z, (1, 4, 2**29, 1), (0, 0, 0, 0)))


# ---------------------------------------------------------------------------
# errors of the library
# ---------------------------------------------------------------------------

def test_missing_model_is_an_io_error_naming_the_path(tmp_path):
    path = tmp_path / "no such model"
    with pytest.raises(KlvaeError) as info:
        Model.load(path)
    e = info.value
    assert e.status == Status.IO == 3 and isinstance(e.status, int)
    assert e.status_name == klvae._lib._status_string(3) != ""
    assert str(path) in e.message and e.message in str(e) and e.status_name in str(e)


def test_malformed_files_are_format_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(KlvaeError) as info:
        Model.load(bad)
    assert info.value.status == Status.FORMAT and str(bad) in info.value.message
    notimage = tmp_path / "x.png"
    notimage.write_bytes(b"hello")
    with pytest.raises(KlvaeError) as info:
        klvae.read_image(notimage)
    assert info.value.status == Status.FORMAT
    with pytest.raises(KlvaeError) as info:
        klvae.read_image(tmp_path / "missing.png")
    assert info.value.status == Status.IO and "missing.png" in info.value.message


def test_config_disagreeing_with_weights():
    with pytest.raises(KlvaeError) as info:
        Model.load(FIXTURES / "noquant" / "diffusers", latent_channels=16)
    assert info.value.status == Status.CONFIG and "latent_channels" in info.value.message
    with pytest.raises(KlvaeError) as info:
        Model.load(FIXTURES / "gelu" / "compvis.safetensors")  # 32 groups do not divide 8
    assert info.value.status == Status.CONFIG


def test_bad_options_are_option_errors(tmp_path):
    with pytest.raises(KlvaeError) as info:
        Model.create(config="tiny", no_such_key=1)
    assert info.value.status == Status.OPTION and "no_such_key" in info.value.message
    with pytest.raises(KlvaeError) as info:
        Model.load(FIXTURES / "noquant" / "diffusers", threads="lots")
    assert info.value.status == Status.OPTION
    assert "threads" in info.value.message and "lots" in info.value.message
    with pytest.raises(KlvaeError) as info:
        Model.create(config="enormous")
    assert info.value.status == Status.OPTION
    try:
        Model.create(config="tiny", backend="cuda", threads=1).close()
    except KlvaeError as e:  # no CUDA plugin, driver or device here
        assert e.status == Status.BACKEND_UNAVAILABLE and e.message
    with pytest.raises(ValueError, match="NUL"):
        Model.create(config="ti\0ny")
    with pytest.raises(KlvaeError) as info:
        with Model.create(config="tiny", threads=1) as m:
            m.get("seed")
    assert info.value.status == Status.OPTION


def test_bad_paths_are_python_errors():
    with pytest.raises(TypeError, match="path"):
        Model.load(None)
    with pytest.raises(ValueError, match="empty"):
        Model.load("")
    with pytest.raises(ValueError, match="NUL"):
        Model.load("a\0b")


def test_save_into_a_missing_folder_is_an_io_error(tmp_path, tiny):
    with pytest.raises(KlvaeError) as info:
        tiny.save(tmp_path / "missing" / "deeper" / "model")
    assert info.value.status == Status.IO
    with pytest.raises(KlvaeError) as info:
        klvae.write_png(tmp_path / "missing" / "x.png", np.zeros((3, 4, 4), np.float32))
    assert info.value.status == Status.IO


def test_error_messages_are_per_thread(tmp_path):
    """klvae_last_error is thread-local: each thread reads its own failure's message."""
    results = {}

    def worker(name):
        for _ in range(20):
            try:
                Model.load(tmp_path / f"{name}-missing")
            except KlvaeError as e:
                results.setdefault(name, []).append(f"{name}-missing" in e.message)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("alpha", "beta", "gamma")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {k: all(v) and len(v) == 20 for k, v in results.items()} == dict(alpha=True, beta=True, gamma=True)


def test_errors_pickle():
    e = KlvaeError(8, "bad key")
    back = pickle.loads(pickle.dumps(e))
    assert (back.status, back.message, back.status_name) == (8, "bad key", e.status_name)


# ---------------------------------------------------------------------------
# handles: close, with, use after close, the garbage collector
# ---------------------------------------------------------------------------

def test_close_is_idempotent_and_frees_once(spy):
    frees = spy("klvae_model_free")
    m = Model.create(config="tiny", threads=1)
    assert not m.closed
    m.close()
    m.close()
    assert m.closed and len(frees) == 1
    with Model.create(config="tiny", threads=1) as m2:
        pass
    m2.close()
    assert m2.closed and len(frees) == 2
    m3 = Model.create(config="tiny", threads=1)
    del m3
    gc.collect()
    assert len(frees) == 3


def test_use_after_close_raises(tmp_path):
    m = Model.create(config="tiny", threads=1)
    m.close()
    x = np.zeros((1, 3, 8, 8), np.float32)
    z = np.zeros((1, 4, 4, 4), np.float32)
    for call in (lambda: m.encode(x), lambda: m.decode(z), lambda: m.sample(z, z, 0),
                 lambda: m.get("threads"), lambda: m.save(tmp_path / "m"),
                 lambda: m.in_channels, lambda: m.latent_channels, lambda: m.downsampling_factor,
                 lambda: m.scaling_factor, lambda: m.backend, lambda: m.parameter_count,
                 lambda: m.__enter__()):
        with pytest.raises(ValueError, match="model is closed"):
            call()
    assert repr(m) == "<klvae.Model (closed)>"
    with pytest.raises(ValueError, match="model is closed"):
        Trainer(m)


def test_handles_cannot_be_copied_or_constructed_directly(tiny):
    with pytest.raises(TypeError):
        copy.copy(tiny)
    with pytest.raises(TypeError):
        pickle.dumps(tiny)
    with pytest.raises(TypeError):
        Model()
    with pytest.raises(TypeError, match="klvae.Model"):
        Trainer("not a model")


def test_close_from_another_thread_while_in_use():
    m = load_fixture("noquant")
    x = rand((1, 3, 32, 32))
    errors, done = [], []

    def worker():
        try:
            while True:
                m.encode(x)
                done.append(1)
        except ValueError as e:
            errors.append(str(e))

    t = threading.Thread(target=worker)
    t.start()
    while not done:
        time.sleep(0.001)
    m.close()
    t.join(30)
    assert errors == ["model is closed"]


# ---------------------------------------------------------------------------
# threads: the GIL is released, handles are serialised
# ---------------------------------------------------------------------------

def test_two_models_run_concurrently_in_two_threads():
    """ctypes releases the GIL during foreign calls: two models in two threads compute
    at the same time, and both give the results they give alone."""
    x = rand((1, 3, 128, 192), seed=5)
    models = [load_fixture("noquant"), load_fixture("noquant")]
    reference = models[0].encode(x)[0]
    barrier = threading.Barrier(2)
    results = [[], []]

    def encode(i):
        barrier.wait()
        for _ in range(3):
            results[i].append(models[i].encode(x)[0])

    threads = [threading.Thread(target=encode, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(r, reference) for r in results[0] + results[1])
    for m in models:
        m.close()

    # The overlap, timed by the library itself: a training step reports its own wall
    # time (stats["seconds"], measured inside C). Calls that ran one after the other
    # (the GIL held) take at least the sum of those times; concurrent ones about the
    # longest of them.
    batch = rand((2, 3, 64, 64), seed=6)
    with Model.create(config="tiny", seed=1, threads=1) as ma, Trainer(ma) as ta, \
         Model.create(config="tiny", seed=2, threads=1) as mb, Trainer(mb) as tb:
        trainers = [ta, tb]
        for attempt in range(3):
            barrier = threading.Barrier(3)
            inside = [None, None]

            def step(i):
                barrier.wait()
                inside[i] = trainers[i].step(batch)["seconds"]

            threads = [threading.Thread(target=step, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            barrier.wait()
            t0 = time.perf_counter()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            if wall < 0.75 * sum(inside):
                break
        else:
            pytest.fail(f"no overlap: {wall:.3f} s for two steps of {inside[0]:.3f} s and {inside[1]:.3f} s")


def test_python_threads_run_during_a_call():
    """While one thread is inside libklvae, another keeps running Python code."""
    x = rand((1, 3, 256, 384), seed=6)
    with load_fixture("noquant") as m:
        m.encode(x)
        for attempt in range(3):
            span = []

            def work():
                t0 = time.perf_counter()
                m.encode(x)
                span.extend([t0, time.perf_counter()])

            t = threading.Thread(target=work)
            stamps = []
            t.start()
            while t.is_alive():
                stamps.append(time.perf_counter())
                time.sleep(0.002)
            t.join()
            t0, t1 = span
            inside = [s for s in stamps if t0 <= s <= t1]
            gaps = np.diff([t0] + inside + [t1])
            # with the GIL held during the call, one gap would cover the whole call
            if len(inside) >= 3 and gaps.max() < 0.5 * (t1 - t0):
                break
        else:
            pytest.fail(f"the main thread stalled for {gaps.max():.3f} s of a {t1 - t0:.3f} s call")


def test_one_model_many_threads_is_serialised_and_correct(noquant):
    xs = [rand((1, 3, 32, 32), seed=s) for s in range(4)]
    want = [noquant.encode(x)[0] for x in xs]
    got = [[] for _ in xs]

    def work(i):
        for _ in range(5):
            got[i].append(noquant.encode(xs[i])[0])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert len(got[i]) == 5 and all(np.array_equal(g, want[i]) for g in got[i])


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------

def test_trainer_steps_give_finite_losses(tiny):
    with Trainer(tiny, learning_rate=1e-3, seed=3) as t:
        assert t.step_count == 0 and t.model is tiny
        assert t.get("learning_rate") == "0.001"
        assert t.get("perceptual_weight") == "0"  # no LPIPS weights given
        before = tiny.encode(rand((1, 3, 16, 16)))[0]
        for k in range(3):
            s = t.step(rand((2, 3, 32, 32), seed=k))
            assert set(s) == set(klvae.STEP_STATS_FIELDS)
            assert s["step"] == k and isinstance(s["step"], int)
            counts = ("skipped", "spare", "skipped_steps")
            assert all(isinstance(s[f], float) and np.isfinite(s[f])
                       for f in klvae.STEP_STATS_FIELDS[1:] if f not in counts)
            assert s["skipped"] == 0 and s["skipped_steps"] == 0
            assert s["total_loss"] > 0 and s["rec_loss"] > 0 and s["seconds"] > 0
            assert s["disc_factor"] == 0.0  # the GAN starts at step 50001
        assert t.step_count == 3
        assert not np.array_equal(before, tiny.encode(rand((1, 3, 16, 16)))[0])  # weights moved
        assert "step_count=3" in repr(t)
    assert t.closed and repr(t) == "<klvae.Trainer (closed)>"


def test_trainer_matches_the_pytorch_reference(tmp_path):
    """The C tests' reference: three LDM steps of a tiny VAE with LPIPS and the GAN
    (tools/train_reference.py), losses and final weights within 1e-4 relative."""
    options = dict(learning_rate=1e-4, disc_learning_rate=1e-4, pixel_loss="l1", perceptual_weight=1,
                   lpips_weights=TRAIN / "lpips.safetensors", lpips_dropout=0, kl_weight=0.01,
                   posterior="mode", disc_start=0, disc_factor=1, disc_weight=0.5, disc_loss="hinge",
                   disc_update="fresh", disc_layers=3, disc_channels=8,
                   disc_weights=TRAIN / "disc.safetensors", threads=1)
    ref, _ = read_safetensors(TRAIN / "steps.safetensors")
    names = dict(total_loss="total", rec_loss="rec", perceptual_loss="perceptual", nll_loss="nll",
                 kl_loss="kl", g_loss="g_loss", d_weight="d_weight", disc_factor="disc_factor",
                 d_loss="d_loss", logits_real="logits_real", logits_fake="logits_fake")
    with Model.load(TRAIN / "vae", **options) as m, Trainer(m, **options) as t:
        assert t.get("perceptual_weight") == "1"
        for k in range(3):
            s = t.step(ref[f"x.{k}"])
            assert s["step"] == k
            for field, term in names.items():
                want = float(ref[f"loss.{k}.{term}"][0])
                assert abs(s[field] - want) <= 1e-4 * abs(want) + 1e-12, (k, field, s[field], want)
        t.export(tmp_path / "final")
    final, _ = read_safetensors(tmp_path / "final" / "diffusion_pytorch_model.safetensors")
    checked = 0
    for name, got in final.items():
        if "to_k.bias" in name:  # see tests/test_train.c: round-off turned into Adam steps
            continue
        want = ref[f"final.vae.{name}"]
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), name
        checked += 1
    assert checked > 20


RESUME_OPTIONS = dict(posterior="sample", lpips_weights=TRAIN / "lpips.safetensors", lpips_dropout=0.5,
                      disc_start=1, disc_channels=8, ema_decay=0.9, learn_logvar=True, seed=5,
                      learning_rate=1e-4, threads=1)


def _resume_trainer():
    m = Model.load(TRAIN / "vae", **RESUME_OPTIONS)
    return m, Trainer(m, **RESUME_OPTIONS)


def _batch(k):
    return rand((2, 3, 32, 40), seed=9000 + k)


def test_save_load_continues_bit_for_bit(tmp_path):
    ma, a = _resume_trainer()
    stats_a = [a.step(_batch(k)) for k in range(4)]
    mb, b = _resume_trainer()
    for k in range(2):
        b.step(_batch(k))
    b.set_note("data_position", "4")
    b.save(tmp_path / "run.ckpt")
    b.close()
    mb.close()
    mb, b = _resume_trainer()  # as a new process would: initial weights plus the checkpoint
    b.load(tmp_path / "run.ckpt")
    assert b.step_count == 2 and b.get_note("data_position") == "4"
    stats_b = [b.step(_batch(k)) for k in range(2, 4)]
    for sa, sb in zip(stats_a[2:], stats_b):
        sa.pop("seconds"), sb.pop("seconds")
        assert sa == sb  # every float, bit for bit
    assert stats_a[-1]["g_loss"] != 0 and stats_a[-1]["logvar"] != 0  # the GAN ran, logvar learned
    a.export(tmp_path / "a")
    b.export(tmp_path / "b")
    b.export(tmp_path / "b_ema", ema=True)
    weights = lambda d: (tmp_path / d / "diffusion_pytorch_model.safetensors").read_bytes()
    assert weights("a") == weights("b")
    assert weights("b_ema") != weights("b")
    ma.save(tmp_path / "ma")
    assert weights("ma") == weights("a")
    a.save(tmp_path / "a.ckpt")
    assert (tmp_path / "a.ckpt").read_bytes() != b""
    for h in (a, b, ma, mb):
        h.close()


def test_step_stats_struct_size_is_set(tiny, spy):
    import ctypes
    calls = spy("klvae_trainer_step")
    with Trainer(tiny) as t:
        t.step(rand((1, 3, 16, 16)))
    stats = calls[-1][5]._obj
    assert stats.struct_size == ctypes.sizeof(klvae._lib.StepStats) == 136
    assert stats.step == 0


def test_trainer_notes_and_options(tiny, tmp_path):
    with Trainer(tiny, grad_accum=2, ema_decay=0) as t:
        t.set_note("epoch", "3")
        t.set_note("epoch", "4")
        assert t.get_note("epoch") == "4"
        assert t.get_note("missing", None) is None
        with pytest.raises(KlvaeError) as info:
            t.get_note("missing")
        assert info.value.status == Status.OPTION
        with pytest.raises(KlvaeError) as info:
            t.set_note("k", "v" * 300)
        assert info.value.status in (Status.INVALID_ARGUMENT, Status.OPTION)
        with pytest.raises(KlvaeError) as info:
            t.get("block_out_channels")  # a model key, not a trainer key
        assert info.value.status == Status.OPTION
        assert t.get("grad-accum") == "2"
        with pytest.raises(ValueError, match="not divisible by grad_accum = 2"):
            t.step(rand((3, 3, 16, 16)))
        with pytest.raises(KlvaeError) as info:
            t.export(tmp_path / "ema", ema=True)  # no EMA without ema_decay
        assert info.value.status == Status.INVALID_ARGUMENT
    with pytest.raises(KlvaeError) as info:
        Trainer(tiny, learning_rate="fast")
    assert info.value.status == Status.OPTION and "learning_rate" in info.value.message
    with pytest.raises(KlvaeError) as info:
        Trainer(tiny, lpips_weights=TRAIN / "missing.safetensors")
    assert info.value.status == Status.IO and "missing.safetensors" in info.value.message


def test_trainer_step_shape_errors(tiny, spy):
    spy("klvae_trainer_step", forbid=True)
    with Trainer(tiny) as t:
        with pytest.raises(ValueError, match="at least 16"):
            t.step(np.zeros((1, 3, 8, 16), np.float32))
        with pytest.raises(ValueError, match="channels"):
            t.step(np.zeros((1, 1, 16, 16), np.float32))
        with pytest.raises(ValueError, match="multiples of the downsampling factor 2"):
            t.step(np.zeros((1, 3, 17, 16), np.float32))


def test_trainer_load_errors(tmp_path, tiny):
    with Trainer(tiny) as t:
        with pytest.raises(KlvaeError) as info:
            t.load(tmp_path / "missing.ckpt")
        assert info.value.status == Status.IO and "missing.ckpt" in info.value.message
        with pytest.raises(KlvaeError) as info:
            t.load(TRAIN / "disc.safetensors")
        assert info.value.status == Status.FORMAT
        m, other = _resume_trainer()
        other.save(tmp_path / "other.ckpt")
        other.close()
        m.close()
        with pytest.raises(KlvaeError) as info:
            t.load(tmp_path / "other.ckpt")
        assert info.value.status == Status.CONFIG
        assert t.step_count == 0


def test_trainer_and_model_lifetimes(spy):
    model_frees, trainer_frees = spy("klvae_model_free"), spy("klvae_trainer_free")
    m = Model.create(config="tiny", threads=1)
    t = Trainer(m)
    # the model cannot be closed under its trainer
    with pytest.raises(RuntimeError, match="in use by 1 open Trainer"):
        m.close()
    assert not m.closed and m.encode(np.zeros((1, 3, 8, 8), np.float32))[0].shape == (1, 4, 4, 4)
    t.close()
    t.close()
    with pytest.raises(ValueError, match="trainer is closed"):
        t.step(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(ValueError, match="trainer is closed"):
        _ = t.step_count
    m.close()
    assert (len(model_frees), len(trainer_frees)) == (1, 1)

    # nested with blocks close the trainer first
    with Model.create(config="tiny", threads=1) as m, Trainer(m) as t:
        t.step(rand((1, 3, 16, 16)))
    assert m.closed and t.closed and (len(model_frees), len(trainer_frees)) == (2, 2)

    # an exception leaving the model's block is not hidden; the model is freed by its trainer
    with pytest.raises(KeyError):
        with Model.create(config="tiny", threads=1) as m:
            t = Trainer(m)
            raise KeyError("boom")
    assert m.closed and len(model_frees) == 2
    with pytest.raises(ValueError, match="trainer's model is closed"):
        t.step(rand((1, 3, 16, 16)))
    t.close()
    assert (len(model_frees), len(trainer_frees)) == (3, 3)
    assert trainer_frees[-1][0] is not None


def test_garbage_collection_frees_trainer_before_model(monkeypatch):
    """Even in a reference cycle, whose finalizers run in any order."""
    order = []
    lib = klvae._lib.lib
    model_free, trainer_free = lib.klvae_model_free, lib.klvae_trainer_free
    monkeypatch.setattr(lib, "klvae_model_free", lambda h: (order.append("model"), model_free(h))[1])
    monkeypatch.setattr(lib, "klvae_trainer_free", lambda h: (order.append("trainer"), trainer_free(h))[1])
    for _ in range(3):
        m = Model.create(config="tiny", threads=1)
        t = Trainer(m)
        cycle = {"m": m, "t": t}
        m.cycle = t.cycle = cycle
        del m, t, cycle
        gc.collect()
        assert order == ["trainer", "model"], order
        order.clear()
    m = Model.create(config="tiny", threads=1)
    t = Trainer(m)
    del m  # the trainer keeps its model alive
    gc.collect()
    assert order == [] and not t.model.closed
    del t
    gc.collect()
    assert order == ["trainer", "model"]


def test_trainer_and_other_model_run_in_parallel(tiny):
    """A trainer step in one thread, inference on another model in another."""
    with load_fixture("noquant") as other, Trainer(tiny) as t:
        x = rand((1, 3, 64, 64))
        want = other.encode(x)[0]
        out = {}
        th = threading.Thread(target=lambda: out.setdefault("stats", [t.step(rand((2, 3, 32, 32), seed=k)) for k in range(3)]))
        th.start()
        got = [other.encode(x)[0] for _ in range(3)]
        th.join()
        assert all(np.array_equal(g, want) for g in got)
        assert [s["step"] for s in out["stats"]] == [0, 1, 2]


# ---------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------

def test_png_round_trip(tmp_path):
    image = rand((3, 5, 7), seed=11)
    image[0, 0, 0] = 3.0       # clamped
    image[1, 0, 0] = np.nan    # NaN becomes 0
    klvae.write_png(tmp_path / "a.png", image)
    back = klvae.read_image(tmp_path / "a.png")
    assert back.shape == (3, 5, 7) and back.dtype == np.float32 and back.flags.c_contiguous
    levels = np.round(255 * np.clip(np.nan_to_num(image, nan=-1.0) * 0.5 + 0.5, 0, 1))
    levels[1, 0, 0] = 0
    np.testing.assert_allclose(back, levels / 255 * 2 - 1, atol=1e-6)
    # batch of one, other dtypes, paths as str
    klvae.write_png(str(tmp_path / "b.png"), image[np.newaxis].astype(np.float64))
    assert np.array_equal(klvae.read_image(str(tmp_path / "b.png")), back)


def test_png_shape_errors(tmp_path):
    for shape in [(5, 7), (4, 5, 7), (2, 3, 5, 7), (3, 0, 7)]:
        with pytest.raises(ValueError, match=r"\(3, h, w\)"):
            klvae.write_png(tmp_path / "x.png", np.zeros(shape, np.float32))
    assert not list(tmp_path.iterdir())


def test_read_image_frees_the_library_buffer(tmp_path, spy):
    frees = spy("klvae_free")
    klvae.write_png(tmp_path / "a.png", rand((3, 4, 4)))
    klvae.read_image(tmp_path / "a.png")
    assert len(frees) == 1 and frees[0][0] is not None
    with pytest.raises(KlvaeError):
        klvae.read_image(tmp_path / "missing.png")
    assert len(frees) == 1  # nothing to free after an error: the pointer is NULL


def test_data_parallel_communicator_through_ctypes():
    """klvae_trainer_set_comm with Python callbacks for a world of one rank: the
    declaration of klvae_comm_t matches the header (the library calls both callbacks
    with the promised arguments), a failing callback is Status.COMM with the callback's
    name in the message, and a trainer with a communicator steps."""
    import ctypes
    from klvae import _lib
    calls = []

    def allreduce(ctx, data, count, kind):
        calls.append(("allreduce_sum", ctx, count, kind))
        return 0

    def broadcast(ctx, data, size, root):
        calls.append(("broadcast", ctx, size, root))
        return 0

    keep = (_lib.ALLREDUCE_SUM_FN(allreduce), _lib.BROADCAST_FN(broadcast),
            _lib.ALLREDUCE_SUM_FN(lambda ctx, data, count, kind: 5))
    comm = _lib.Comm(ctypes.sizeof(_lib.Comm), 0, 1, 1234, keep[0], keep[1])
    with Model.create(config="tiny", threads=1) as m, Trainer(m, disc_start=0, disc_layers=1) as t:
        assert _lib.lib.klvae_trainer_set_comm(t._live(), ctypes.byref(comm)) == 0
        assert {c[0] for c in calls} == {"allreduce_sum", "broadcast"}
        assert all(c[1] == 1234 for c in calls)
        assert all(c[3] == 0 for c in calls if c[0] == "broadcast")  # root 0
        assert {c[3] for c in calls if c[0] == "allreduce_sum"} <= {0, 1}  # float32, float64
        calls.clear()
        stats = t.step(rand((2, 3, 32, 32)))
        assert stats["step"] == 0 and np.isfinite(stats["total_loss"])
        assert any(c[0] == "allreduce_sum" and c[3] == 0 for c in calls)  # the gradients
        failing = _lib.Comm(ctypes.sizeof(_lib.Comm), 0, 1, None, keep[2], keep[1])
        assert _lib.lib.klvae_trainer_set_comm(t._live(), ctypes.byref(failing)) == Status.COMM
        assert b"allreduce_sum failed (returned 5)" in _lib.lib.klvae_last_error()


# ---------------------------------------------------------------------------
# latent datasets (klvae.encode_dataset, klvae.LatentFolder, klvae.latent_stats)
# ---------------------------------------------------------------------------

# (h, w): shorter side 16 or more; the first two need no resize for size 16
DATASET_SIZES = [(16, 23), (29, 16), (37, 53), (20, 20), (45, 31)]


def _image_folder(root):
    root.mkdir()
    (root / "sub").mkdir()
    rng = np.random.default_rng(3)
    for i, (h, w) in enumerate(DATASET_SIZES):
        img = np.round(rng.uniform(0, 255, (3, h, w))) / 127.5 - 1
        klvae.write_png(root / ("sub" if i > 2 else ".") / f"im{i}.png", img.astype(np.float32))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def test_encode_dataset_rows_are_the_encodings_of_the_crops(tmp_path, noquant):
    data = _image_folder(tmp_path / "data")
    summary = klvae.encode_dataset(noquant, data, tmp_path / "out", size=16, shard_size=2)
    assert summary["finished"] and summary["dataset_complete"]
    assert (summary["images_done"], summary["images_skipped"]) == (5, 1)
    folder = klvae.LatentFolder(tmp_path / "out")
    assert len(folder) == 5 and len(folder.shard_names) == 3
    records = list(folder.records())
    assert [r["path"] for r in records] == ["im0.png", "im1.png", "im2.png", "sub/im3.png",
                                            "sub/im4.png"]
    assert [e["path"] for e in folder.errors()] == ["broken.png"]
    seen = 0
    for shard in folder:
        assert shard.arrays["mean"].shape == (len(shard), 4, 2, 2)
        assert shard.arrays["original_size"].dtype == np.int32
        for row, rec in enumerate(shard.records):
            assert rec["row"] == row
            top, left, h, w = rec["crop"]
            assert list(shard.arrays["crop_top_left"][row]) == [top, left]
            assert list(shard.arrays["original_size"][row]) == rec["original_size"]
            if rec["resized_size"] == rec["original_size"]:  # a plain crop: check the bits
                img = klvae.read_image(data / rec["path"])[:, top:top + h, left:left + w]
                mean, logvar = noquant.encode(img)
                assert np.array_equal(shard.arrays["mean"][row], mean[0])
                assert np.array_equal(shard.arrays["logvar"][row], logvar[0])
                seen += 1
    assert seen == 2


def test_shards_open_with_safetensors_numpy(tmp_path, noquant):
    try:
        import safetensors.numpy as st
    except ImportError:
        # CI requires every binding test to run; elsewhere say what is missing
        if os.environ.get("KLVAE_REQUIRE_BINDINGS") == "1":
            raise
        pytest.skip("Python's safetensors is not installed ('make deps' puts it in build/pydeps)")
    data = _image_folder(tmp_path / "data")
    klvae.encode_dataset(noquant, data, tmp_path / "out", size=16, flip=True, dtype="fp16")
    for shard in klvae.LatentFolder(tmp_path / "out"):
        theirs = st.load_file(shard.path)
        assert sorted(theirs) == sorted(shard.arrays)
        for name, arr in theirs.items():
            assert np.array_equal(arr.astype(shard.arrays[name].dtype), shard.arrays[name])


def test_bf16_dataset_holds_the_rounded_values(tmp_path, noquant):
    data = _image_folder(tmp_path / "data")
    klvae.encode_dataset(noquant, data, tmp_path / "f32", size=16)
    klvae.encode_dataset(noquant, data, tmp_path / "bf16", size=16, dtype="bf16")
    a = next(iter(klvae.LatentFolder(tmp_path / "f32"))).arrays["mean"]
    b = next(iter(klvae.LatentFolder(tmp_path / "bf16"))).arrays["mean"]
    bits = a.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16).astype(np.uint32)
    assert np.array_equal(b, rounded.view(np.float32))


def test_progress_stops_and_the_next_call_continues(tmp_path, noquant):
    data = _image_folder(tmp_path / "data")
    klvae.encode_dataset(noquant, data, tmp_path / "whole", size=16, shard_size=2,
                         encode_batch=1)
    calls = []

    def stop_after_first_shard(d):
        calls.append(d)
        if d["shards_done"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        klvae.encode_dataset(noquant, data, tmp_path / "out", progress=stop_after_first_shard,
                             size=16, shard_size=2, encode_batch=1)
    assert any(c["skipped_path"] == "broken.png" for c in calls)
    assert not (tmp_path / "out" / "manifest.json").read_text().count('"complete": true')
    summary = klvae.encode_dataset(noquant, data, tmp_path / "out", size=16, shard_size=2,
                                   encode_batch=1)
    assert summary["images_resumed"] == 1 and summary["finished"]
    for name in sorted(os.listdir(tmp_path / "whole")):
        if name.endswith((".safetensors", ".json", ".jsonl")):
            assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()


def test_latent_stats_agree_with_numpy(tmp_path, noquant):
    data = _image_folder(tmp_path / "data")
    klvae.encode_dataset(noquant, data, tmp_path / "out", size=16, store="sample", seed=5)
    stats = klvae.latent_stats(tmp_path / "out")
    z = np.concatenate([s.arrays["latent"] for s in klvae.LatentFolder(tmp_path / "out")])
    z = z.astype(np.float64)
    np.testing.assert_allclose(stats["mean"], z.mean(axis=(0, 2, 3)), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats["std"], z.std(axis=(0, 2, 3)), rtol=1e-9)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["latent_stats"]["scaling_factor"] == stats["scaling_factor"]


def test_encode_dataset_errors(tmp_path, noquant):
    data = _image_folder(tmp_path / "data")
    with pytest.raises(KlvaeError) as e:
        klvae.encode_dataset(noquant, data, tmp_path / "out", size=12)
    assert e.value.status == Status.INVALID_ARGUMENT and "size 12" in e.value.message
    with pytest.raises(KlvaeError) as e:
        klvae.encode_dataset(noquant, data, tmp_path / "out", crop="middle")
    assert e.value.status == Status.OPTION
    with pytest.raises(KlvaeError) as e:
        klvae.encode_dataset(noquant, tmp_path / "nothing", tmp_path / "out")
    assert e.value.status == Status.IO
    with pytest.raises(KlvaeError) as e:
        klvae.latent_stats(tmp_path)
    assert e.value.status == Status.IO
    assert not (tmp_path / "out").exists()
