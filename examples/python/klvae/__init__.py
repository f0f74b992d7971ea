"""klvae: Python bindings for libklvae, the Stable Diffusion VAE in C (pure ctypes).

    import klvae
    with klvae.Model.load("sd-vae-ft-mse", threads=2) as model:
        image = klvae.read_image("photo.png")        # (3, h, w) float32 in [-1, 1]
        mean, logvar = model.encode(image)           # (1, 4, h/8, w/8) each
        z = model.sample(mean, logvar, seed=7)
        klvae.write_png("back.png", model.decode(z))

Latent datasets for diffusion training (docs/latents.md):

    summary = klvae.encode_dataset(model, "images/", "latents/", size=256, flip=True)
    for shard in klvae.LatentFolder("latents/"):     # numpy arrays and their records
        shard.arrays["mean"], shard.arrays["logvar"], shard.records

Arrays are numpy float32, NCHW. A C-contiguous float32 array (or anything
np.asarray wraps as one without copying: a memoryview, an array.array reshaped
through np.frombuffer) is handed to C by pointer, without a copy; any other dtype
or layout is converted once, with np.ascontiguousarray(x, dtype=np.float32).
A 3-D (c, h, w) input is a batch of one; results are always 4-D.

The library is found through $KLVAE_LIBRARY, then libklvae.so.0 next to this
package, then the system search path (see klvae._lib). Errors of the library
raise KlvaeError (.status, .status_name, .message); bad shapes raise ValueError
before any C call; a closed handle raises ValueError("model is closed").
"""
from ._lib import STEP_STATS_FIELDS, KlvaeError, LibraryError, Status, lib as _cdll, library_path
from ._api import Model, Trainer, options, read_image, write_png
from ._latents import (LatentFolder, LatentShard, encode_dataset, latent_stats,
                       read_safetensors)

__version__ = "0.2.0"

#: The loaded library's version string, e.g. "0.1.0".
library_version = _cdll.klvae_version_string().decode()
#: The loaded library's version number, MAJOR * 10000 + MINOR * 100 + PATCH.
library_version_number = int(_cdll.klvae_version())

__all__ = [
    "KlvaeError", "LatentFolder", "LatentShard", "LibraryError", "Model", "STEP_STATS_FIELDS",
    "Status", "Trainer", "encode_dataset", "latent_stats", "library_path", "library_version",
    "library_version_number", "options", "read_image", "read_safetensors", "write_png",
]
