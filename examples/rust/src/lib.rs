//! Safe Rust bindings to libklvae, the Stable Diffusion KL-f8 autoencoder (diffusers'
//! `AutoencoderKL`) as a C library: load or create a model, encode images to the
//! posterior, draw seeded latents, decode, save, and train.
//!
//! The C header `include/klvae.h` is the manual; this crate adds only what Rust can
//! check itself: handles are freed exactly once ([`Drop`]), slice lengths and sizes are
//! checked before any call into C (an [`Error`] with [`Status::InvalidArgument`] that
//! says which slice and what length was expected), and the borrow checker enforces the
//! C rules about lifetimes and threads:
//!
//! * A [`Trainer`] borrows its [`Model`] mutably, so the model outlives the trainer and
//!   nothing else uses it meanwhile. Between steps, [`Trainer::model`] gives the model
//!   back for `encode`/`decode` (the header allows that).
//! * The header says that one handle must not be used by two threads at once but may move
//!   between threads. So [`Model`], [`Trainer`] and [`Options`] are `Send` (move one to
//!   another thread and use it there) and not `Sync` (no two threads can hold `&Model`).
//!   Different models may be used from different threads at the same time. Each model
//!   computes with its own pool of worker threads (option `threads`).
//! * Error messages come from the C library's thread-local `klvae_last_error()`, which the
//!   wrappers read on the same thread immediately after the failing call.
//!
//! Tensors are `f32`, contiguous NCHW: images `(n, channels, h, w)` with values in
//! [-1, 1], latents `(n, latent_channels, h / f, w / f)` where `f` is
//! [`Model::downsampling_factor`]. Latents are the raw posterior values (the library never
//! applies [`Model::scaling_factor`] or [`Model::shift_factor`]).
//!
//! ```no_run
//! use klvae::{Model, Options};
//!
//! fn main() -> Result<(), klvae::Error> {
//!     let model = Model::load("sd-vae-ft-mse", &Options::new())?;
//!     let image = klvae::read_image("photo.png")?; // (3, h, w); h, w multiples of 8
//!     let (h, w) = (image.height, image.width);
//!     let (mean, logvar) = model.encode(&image.pixels, 1, h, w)?;
//!     let f = model.downsampling_factor();
//!     let z = model.sample(&mean, &logvar, 1, h / f, w / f, 42)?;
//!     let decoded = model.decode(&z, 1, h / f, w / f)?;
//!     klvae::write_png("out.png", &decoded, h, w)?;
//!     Ok(())
//! }
//! ```
//!
//! A model is `Send` but not `Sync`: it may move to another thread, but two threads cannot
//! share one.
//!
//! ```compile_fail
//! fn shared<T: Sync>() {}
//! shared::<klvae::Model>();
//! ```

#![warn(missing_docs)]

pub mod sys;

use std::ffi::{CStr, CString};
use std::fmt;
use std::os::raw::{c_char, c_int};
use std::path::Path;
use std::ptr::{self, NonNull};

/// `std::result::Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/* ------------------------------------------------------------------------ */
/* Status and errors                                                         */
/* ------------------------------------------------------------------------ */

/// Why a call failed: the C library's `klvae_status_t` (without `KLVAE_OK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Status {
    /// A count or size <= 0, an image size that is not a multiple of the downsampling
    /// factor, a slice of the wrong length, an impossible size, a string with a NUL byte.
    InvalidArgument,
    /// An allocation failed, or a size does not fit in memory at all.
    OutOfMemory,
    /// A file could not be opened, read, written or renamed.
    Io,
    /// A file is malformed.
    Format,
    /// A tensor has the wrong shape.
    Shape,
    /// A weight the configuration needs is not in the file.
    MissingTensor,
    /// A configuration is invalid or disagrees with the weights.
    Config,
    /// An unknown option key, or a value that does not parse or is out of range.
    Option,
    /// Valid input this build cannot handle.
    Unsupported,
    /// The requested backend cannot be used here.
    BackendUnavailable,
    /// The backend failed while computing.
    Backend,
    /// A bug in libklvae.
    Internal,
    /// A NaN or infinity where a finite value is needed.
    NonFinite,
    /// The handle is in use by another thread.
    Busy,
    /// A buffer is too small for the value.
    BufferTooSmall,
    /// Data-parallel training: a communicator callback or another rank failed.
    Comm,
    /// A status this binding does not know (from a newer library).
    Unknown(i32),
}

impl Status {
    /// The status for a C status number; `None` for `KLVAE_OK` (0).
    pub fn from_code(code: i32) -> std::option::Option<Status> {
        Some(match code {
            sys::KLVAE_OK => return None,
            sys::KLVAE_ERR_INVALID_ARGUMENT => Status::InvalidArgument,
            sys::KLVAE_ERR_OUT_OF_MEMORY => Status::OutOfMemory,
            sys::KLVAE_ERR_IO => Status::Io,
            sys::KLVAE_ERR_FORMAT => Status::Format,
            sys::KLVAE_ERR_SHAPE => Status::Shape,
            sys::KLVAE_ERR_MISSING_TENSOR => Status::MissingTensor,
            sys::KLVAE_ERR_CONFIG => Status::Config,
            sys::KLVAE_ERR_OPTION => Status::Option,
            sys::KLVAE_ERR_UNSUPPORTED => Status::Unsupported,
            sys::KLVAE_ERR_BACKEND_UNAVAILABLE => Status::BackendUnavailable,
            sys::KLVAE_ERR_BACKEND => Status::Backend,
            sys::KLVAE_ERR_INTERNAL => Status::Internal,
            sys::KLVAE_ERR_NONFINITE => Status::NonFinite,
            sys::KLVAE_ERR_BUSY => Status::Busy,
            sys::KLVAE_ERR_BUFFER_TOO_SMALL => Status::BufferTooSmall,
            sys::KLVAE_ERR_COMM => Status::Comm,
            other => Status::Unknown(other),
        })
    }

    /// The C status number.
    pub fn code(self) -> i32 {
        match self {
            Status::InvalidArgument => sys::KLVAE_ERR_INVALID_ARGUMENT,
            Status::OutOfMemory => sys::KLVAE_ERR_OUT_OF_MEMORY,
            Status::Io => sys::KLVAE_ERR_IO,
            Status::Format => sys::KLVAE_ERR_FORMAT,
            Status::Shape => sys::KLVAE_ERR_SHAPE,
            Status::MissingTensor => sys::KLVAE_ERR_MISSING_TENSOR,
            Status::Config => sys::KLVAE_ERR_CONFIG,
            Status::Option => sys::KLVAE_ERR_OPTION,
            Status::Unsupported => sys::KLVAE_ERR_UNSUPPORTED,
            Status::BackendUnavailable => sys::KLVAE_ERR_BACKEND_UNAVAILABLE,
            Status::Backend => sys::KLVAE_ERR_BACKEND,
            Status::Internal => sys::KLVAE_ERR_INTERNAL,
            Status::NonFinite => sys::KLVAE_ERR_NONFINITE,
            Status::Busy => sys::KLVAE_ERR_BUSY,
            Status::BufferTooSmall => sys::KLVAE_ERR_BUFFER_TOO_SMALL,
            Status::Comm => sys::KLVAE_ERR_COMM,
            Status::Unknown(code) => code,
        }
    }

    /// The library's short English description ("invalid argument"; "unknown status" for
    /// numbers it does not know).
    pub fn description(self) -> &'static str {
        // klvae_status_string cannot fail and leaves klvae_last_error alone.
        static_str(unsafe { sys::klvae_status_string(self.code()) })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.description())
    }
}

/// A failed call: the status and the message that names what was wrong (the file, the
/// tensor, the shape, the option key...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// What kind of failure.
    pub status: Status,
    /// The library's message (`klvae_last_error()`), or this crate's for checks made in
    /// Rust before calling C.
    pub message: String,
}

impl Error {
    /// An error with the given status and message.
    pub fn new(status: Status, message: impl Into<String>) -> Error {
        Error {
            status,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Error {
        Error::new(Status::InvalidArgument, message)
    }

    /// The error of a C call that just returned `code` (not `KLVAE_OK`) on this thread.
    fn from_last(code: sys::klvae_status_t) -> Error {
        // Must run right after the failing call, before any other libklvae call on this
        // thread: the message is thread-local and the next status-returning call resets it.
        let message = unsafe { CStr::from_ptr(sys::klvae_last_error()) }
            .to_string_lossy()
            .into_owned();
        Error {
            status: Status::from_code(code).unwrap_or(Status::Unknown(code)),
            message,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            write!(f, "{}", self.status)
        } else {
            write!(f, "{} ({})", self.message, self.status)
        }
    }
}

impl std::error::Error for Error {}

/// Turns a C status into a `Result`, reading the thread's last error on failure.
fn check(code: sys::klvae_status_t) -> Result<()> {
    if code == sys::KLVAE_OK {
        Ok(())
    } else {
        Err(Error::from_last(code))
    }
}

/* ------------------------------------------------------------------------ */
/* Small helpers                                                             */
/* ------------------------------------------------------------------------ */

/// A static C string the library owns as a `&'static str`.
fn static_str(p: *const c_char) -> &'static str {
    if p.is_null() {
        return "";
    }
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .unwrap_or("<not UTF-8>")
}

fn c_string(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::invalid(format!("{} {:?} contains a NUL byte", what, s)))
}

fn c_path(path: &Path) -> Result<CString> {
    #[cfg(unix)]
    let bytes = {
        use std::os::unix::ffi::OsStrExt;
        path.as_os_str().as_bytes().to_vec()
    };
    #[cfg(not(unix))]
    let bytes = match path.to_str() {
        Some(s) => s.as_bytes().to_vec(),
        None => return Err(Error::invalid(format!("path {:?} is not UTF-8", path))),
    };
    CString::new(bytes).map_err(|_| Error::invalid(format!("path {:?} contains a NUL byte", path)))
}

/// Calls a `(buf, size)` getter with a buffer of the size it needs: 256 bytes
/// first, then the size `klvae_last_needed_size` reports when that was too small.
fn get_string(mut call: impl FnMut(*mut c_char, usize) -> sys::klvae_status_t) -> Result<String> {
    let mut size = 256usize;
    loop {
        let mut buf = vec![0u8; size];
        let code = call(buf.as_mut_ptr() as *mut c_char, size);
        if code == sys::KLVAE_OK {
            let len = buf.iter().position(|&b| b == 0).unwrap_or(size);
            buf.truncate(len);
            return Ok(String::from_utf8_lossy(&buf).into_owned());
        }
        if code == sys::KLVAE_ERR_BUFFER_TOO_SMALL {
            let needed = unsafe { sys::klvae_last_needed_size() };
            if needed > size {
                size = needed;
                continue;
            }
        }
        return Err(Error::from_last(code));
    }
}

/// A size for C: positive and within `int`.
fn c_dim(op: &str, name: &str, value: usize) -> Result<c_int> {
    if value == 0 {
        return Err(Error::invalid(format!(
            "{}: {} must be positive, got 0",
            op, name
        )));
    }
    c_int::try_from(value).map_err(|_| {
        Error::invalid(format!(
            "{}: {} = {} does not fit in a C int",
            op, name, value
        ))
    })
}

/// The product of sizes, or an InvalidArgument error if it overflows `usize`.
fn product(op: &str, parts: &[usize]) -> Result<usize> {
    parts
        .iter()
        .try_fold(1usize, |acc, &p| acc.checked_mul(p))
        .ok_or_else(|| Error::invalid(format!("{}: the size {:?} overflows", op, parts)))
}

/// Checks that a slice holds exactly `shape` floats (`names` names each dimension).
fn check_len(op: &str, what: &str, len: usize, shape: &[usize], names: &[&str]) -> Result<usize> {
    let expected = product(op, shape)?;
    if len != expected {
        let dims: Vec<String> = names
            .iter()
            .zip(shape)
            .map(|(n, v)| format!("{} {}", n, v))
            .collect();
        return Err(Error::invalid(format!(
            "{}: {} has {} floats, expected {} ({})",
            op,
            what,
            len,
            expected,
            dims.join(" x ")
        )));
    }
    Ok(expected)
}

/// Checks that an image side is a positive multiple of the downsampling factor.
fn check_side(op: &str, name: &str, value: usize, f: usize) -> Result<c_int> {
    let v = c_dim(op, name, value)?;
    if f == 0 || value % f != 0 {
        return Err(Error::invalid(format!(
            "{}: {} = {} is not a multiple of the downsampling factor {}",
            op, name, value, f
        )));
    }
    Ok(v)
}

/* ------------------------------------------------------------------------ */
/* Version                                                                   */
/* ------------------------------------------------------------------------ */

/// The version of the library actually loaded, as (major, minor, patch).
pub fn version() -> (u32, u32, u32) {
    let v = unsafe { sys::klvae_version() };
    (v / 10000, v / 100 % 100, v % 100)
}

/// The version of the library actually loaded, such as "0.1.0".
pub fn version_string() -> &'static str {
    static_str(unsafe { sys::klvae_version_string() })
}

/// Whether the loaded library can serve these bindings (written against the 0.1 header):
/// the same major version and at least the header's minor.
pub fn version_compatible() -> bool {
    let (major, minor, _) = version();
    major == sys::KLVAE_VERSION_MAJOR && minor >= sys::KLVAE_VERSION_MINOR
}

/* ------------------------------------------------------------------------ */
/* Options                                                                   */
/* ------------------------------------------------------------------------ */

/// Settings for loading, creating and training: string keys and values, parsed and
/// range-checked by the library when they are set (docs/options.md lists every key).
///
/// `Options::new()` is "every key at its default" and allocates nothing until the first
/// [`set`](Options::set).
///
/// ```no_run
/// # fn main() -> Result<(), klvae::Error> {
/// let mut opts = klvae::Options::new();
/// opts.set("config", "tiny")?.set("seed", 7)?.set("threads", 1)?;
/// let same = klvae::Options::from_pairs(&[("config", "tiny"), ("seed", "7"), ("threads", "1")])?;
/// # let _ = same; Ok(()) }
/// ```
pub struct Options {
    /// NULL until the first set: the C API reads NULL as "all defaults".
    raw: *mut sys::klvae_options_t,
}

// One options object may move between threads (the header's thread rules); not Sync.
unsafe impl Send for Options {}

impl Options {
    /// Every key at its default.
    pub fn new() -> Options {
        Options {
            raw: ptr::null_mut(),
        }
    }

    /// Options with each `(key, value)` set in order.
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Result<Options> {
        let mut opts = Options::new();
        for (key, value) in pairs {
            opts.set(key, value)?;
        }
        Ok(opts)
    }

    /// Sets `key` to `value` (any `Display`: `"1e-4"`, `2`, `true`). An unknown key or a
    /// bad value is [`Status::Option`], with a message naming both, and changes nothing.
    /// Dashes in keys work as underscores.
    pub fn set(&mut self, key: &str, value: impl fmt::Display) -> Result<&mut Options> {
        let key = c_string("option key", key)?;
        let value = c_string("option value", &value.to_string())?;
        if self.raw.is_null() {
            let mut raw = ptr::null_mut();
            check(unsafe { sys::klvae_options_create(&mut raw) })?;
            self.raw = raw;
        }
        check(unsafe { sys::klvae_options_set(self.raw, key.as_ptr(), value.as_ptr()) })?;
        Ok(self)
    }

    /// [`set`](Options::set), by value, for building in one expression.
    pub fn with(mut self, key: &str, value: impl fmt::Display) -> Result<Options> {
        self.set(key, value)?;
        Ok(self)
    }

    /// The value of `key`: the one set, or else its default ("" for keys without one).
    pub fn get(&self, key: &str) -> Result<String> {
        let key = c_string("option key", key)?;
        get_string(|buf, size| unsafe { sys::klvae_options_get(self.raw, key.as_ptr(), buf, size) })
    }

    /// The C handle (NULL while no key is set), for use with [`sys`].
    pub fn as_ptr(&self) -> *const sys::klvae_options_t {
        self.raw
    }
}

impl Default for Options {
    fn default() -> Options {
        Options::new()
    }
}

impl Drop for Options {
    fn drop(&mut self) {
        // NULL is a no-op for klvae_options_free.
        unsafe { sys::klvae_options_free(self.raw) };
        self.raw = ptr::null_mut();
    }
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options").field("raw", &self.raw).finish()
    }
}

/// One option key the library accepts, as `klvae_option_describe` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionInfo {
    /// The key (underscores).
    pub key: &'static str,
    /// Its default as option text ("" for keys without one).
    pub default: &'static str,
    /// One paragraph of help.
    pub help: &'static str,
}

/// Every option key the library accepts, in its stable order.
pub fn option_descriptions() -> Vec<OptionInfo> {
    let mut out = Vec::new();
    for index in 0.. {
        let (mut key, mut default, mut help) = (ptr::null(), ptr::null(), ptr::null());
        let code = unsafe { sys::klvae_option_describe(index, &mut key, &mut default, &mut help) };
        if code != sys::KLVAE_OK {
            break;
        }
        out.push(OptionInfo {
            key: static_str(key),
            default: static_str(default),
            help: static_str(help),
        });
    }
    out
}

/* ------------------------------------------------------------------------ */
/* Models                                                                    */
/* ------------------------------------------------------------------------ */

/// A loaded or created autoencoder: configuration, weights, backend, worker threads.
///
/// `Send` but not `Sync`: one thread at a time may use a model, and it may move between
/// threads (the header's rule for handles). Inference takes `&self`; the C calls do
/// mutate the model's scratch state, which is sound because no two threads can hold a
/// `&Model` at once.
pub struct Model {
    raw: NonNull<sys::klvae_model_t>,
}

unsafe impl Send for Model {}

impl Model {
    /// Loads a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`) or
    /// one `.safetensors` file (diffusers, legacy diffusers or CompVis names). `opts` gives
    /// runtime keys (`threads`, `backend`) and may give config keys (see the header).
    pub fn load<P: AsRef<Path>>(path: P, opts: &Options) -> Result<Model> {
        let path = c_path(path.as_ref())?;
        let mut raw = ptr::null_mut();
        check(unsafe { sys::klvae_model_load(path.as_ptr(), opts.as_ptr(), &mut raw) })?;
        Ok(Model::from_raw(raw))
    }

    /// A freshly initialised model from the config keys of `opts` (a named `config` such as
    /// `"sd"`, `"small"` or `"tiny"`, then individual keys on top), weights drawn from
    /// `seed`: the same seed gives the same weights everywhere.
    pub fn create(opts: &Options) -> Result<Model> {
        let mut raw = ptr::null_mut();
        check(unsafe { sys::klvae_model_create(opts.as_ptr(), &mut raw) })?;
        Ok(Model::from_raw(raw))
    }

    fn from_raw(raw: *mut sys::klvae_model_t) -> Model {
        Model {
            raw: NonNull::new(raw).expect("libklvae returned KLVAE_OK and a NULL model"),
        }
    }

    /// Writes the model as a diffusers folder (created if needed; its parent must exist).
    pub fn save<P: AsRef<Path>>(&self, path: P) -> Result<()> {
        let path = c_path(path.as_ref())?;
        check(unsafe { sys::klvae_model_save(self.raw.as_ptr(), path.as_ptr()) })
    }

    /// A trainer for this model; see [`Trainer::new`].
    pub fn trainer(&mut self, opts: &Options) -> Result<Trainer<'_>> {
        Trainer::new(self, opts)
    }

    /// Image channels into the encoder (3 for the published models).
    pub fn in_channels(&self) -> usize {
        unsafe { sys::klvae_model_in_channels(self.raw.as_ptr()) as usize }
    }

    /// Image channels out of the decoder.
    pub fn out_channels(&self) -> usize {
        unsafe { sys::klvae_model_out_channels(self.raw.as_ptr()) as usize }
    }

    /// Channels of the latent (4 for SD, 16 for SD3/FLUX).
    pub fn latent_channels(&self) -> usize {
        unsafe { sys::klvae_model_latent_channels(self.raw.as_ptr()) as usize }
    }

    /// 2^(number of blocks - 1): 8 for SD. Image sides must be multiples of it.
    pub fn downsampling_factor(&self) -> usize {
        unsafe { sys::klvae_model_downsampling_factor(self.raw.as_ptr()) as usize }
    }

    /// The config's `scaling_factor`. Diffusion pipelines feed the denoiser
    /// `(z - shift_factor) * scaling_factor` and decode `z / scaling_factor + shift_factor`.
    pub fn scaling_factor(&self) -> f32 {
        unsafe { sys::klvae_model_scaling_factor(self.raw.as_ptr()) }
    }

    /// The config's `shift_factor`; 0 when it has none.
    pub fn shift_factor(&self) -> f32 {
        unsafe { sys::klvae_model_shift_factor(self.raw.as_ptr()) }
    }

    /// Number of scalar parameters (83,653,863 for SD).
    pub fn parameter_count(&self) -> u64 {
        unsafe { sys::klvae_model_parameter_count(self.raw.as_ptr()) as u64 }
    }

    /// The backend in use: "cpu" or "cuda". With `backend=auto`, `get("backend_reason")`
    /// says why the CPU was chosen (libraries with the CUDA plugin loader).
    pub fn backend(&self) -> &'static str {
        static_str(unsafe { sys::klvae_model_backend(self.raw.as_ptr()) })
    }

    /// The model's value of a config key (`"block_out_channels"` gives `"128,256,512,512"`,
    /// `"shift_factor"` gives `"none"` when there is none) or of the runtime keys
    /// `backend`, `precision`, `threads`. Other keys are [`Status::Option`].
    pub fn get(&self, key: &str) -> Result<String> {
        let key = c_string("key", key)?;
        get_string(|buf, size| unsafe {
            sys::klvae_model_get(self.raw.as_ptr(), key.as_ptr(), buf, size)
        })
    }

    /// The C handle, for use with [`sys`]. It stays owned by this `Model`.
    pub fn as_ptr(&self) -> *mut sys::klvae_model_t {
        self.raw.as_ptr()
    }

    /// Floats in an image batch `(n, in_channels, h, w)`; checks the sizes as `encode` does.
    pub fn image_len(&self, n: usize, h: usize, w: usize) -> Result<usize> {
        let f = self.downsampling_factor();
        let op = "klvae image size";
        c_dim(op, "n", n)?;
        check_side(op, "h", h, f)?;
        check_side(op, "w", w, f)?;
        product(op, &[n, self.in_channels(), h, w])
    }

    /// Floats in the latent `(n, latent_channels, h / f, w / f)` of an image batch of
    /// sides `h`, `w`; checks the sizes as `encode` does.
    pub fn latent_len(&self, n: usize, h: usize, w: usize) -> Result<usize> {
        self.image_len(n, h, w)?;
        let f = self.downsampling_factor();
        product(
            "klvae latent size",
            &[n, self.latent_channels(), h / f, w / f],
        )
    }

    /// Encodes `n` images `(n, in_channels, h, w)` into the posterior's `(mean, logvar)`,
    /// each `(n, latent_channels, h / f, w / f)`. `logvar` is clamped to [-30, 20].
    pub fn encode(
        &self,
        images: &[f32],
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let len = self.latent_len(n, h, w)?;
        let mut mean = vec![0f32; len];
        let mut logvar = vec![0f32; len];
        self.encode_into(images, n, h, w, &mut mean, Some(&mut logvar))?;
        Ok((mean, logvar))
    }

    /// [`encode`](Model::encode) into caller slices; `logvar` may be `None` when it is not
    /// wanted. Every length is checked before the call.
    pub fn encode_into(
        &self,
        images: &[f32],
        n: usize,
        h: usize,
        w: usize,
        mean: &mut [f32],
        logvar: Option<&mut [f32]>,
    ) -> Result<()> {
        let op = "klvae encode";
        let f = self.downsampling_factor();
        let (cn, ch, cw) = (
            c_dim(op, "n", n)?,
            check_side(op, "h", h, f)?,
            check_side(op, "w", w, f)?,
        );
        check_len(
            op,
            "images",
            images.len(),
            &[n, self.in_channels(), h, w],
            &["n", "in_channels", "h", "w"],
        )?;
        let lat = [n, self.latent_channels(), h / f, w / f];
        let lat_names = ["n", "latent_channels", "h / f", "w / f"];
        check_len(op, "mean", mean.len(), &lat, &lat_names)?;
        let logvar_ptr = match logvar {
            Some(lv) => {
                check_len(op, "logvar", lv.len(), &lat, &lat_names)?;
                lv.as_mut_ptr()
            }
            None => ptr::null_mut(),
        };
        check(unsafe {
            sys::klvae_encode(
                self.raw.as_ptr(),
                images.as_ptr(),
                cn,
                ch,
                cw,
                mean.as_mut_ptr(),
                logvar_ptr,
            )
        })
    }

    /// Draws `z = mean + exp(logvar / 2) * eps` for latents `(n, latent_channels, lat_h,
    /// lat_w)`, eps from a counter-based generator: the same seed gives the same `z` on
    /// every machine, backend and thread count.
    pub fn sample(
        &self,
        mean: &[f32],
        logvar: &[f32],
        n: usize,
        lat_h: usize,
        lat_w: usize,
        seed: u64,
    ) -> Result<Vec<f32>> {
        let mut z = vec![0f32; mean.len()];
        self.sample_into(mean, logvar, n, lat_h, lat_w, seed, &mut z)?;
        Ok(z)
    }

    /// [`sample`](Model::sample) into a caller slice.
    #[allow(clippy::too_many_arguments)]
    pub fn sample_into(
        &self,
        mean: &[f32],
        logvar: &[f32],
        n: usize,
        lat_h: usize,
        lat_w: usize,
        seed: u64,
        z: &mut [f32],
    ) -> Result<()> {
        let op = "klvae sample";
        let (cn, ch, cw) = self.latent_dims(op, n, lat_h, lat_w)?;
        let shape = [n, self.latent_channels(), lat_h, lat_w];
        let names = ["n", "latent_channels", "lat_h", "lat_w"];
        check_len(op, "mean", mean.len(), &shape, &names)?;
        check_len(op, "logvar", logvar.len(), &shape, &names)?;
        check_len(op, "z", z.len(), &shape, &names)?;
        check(unsafe {
            sys::klvae_sample(
                self.raw.as_ptr(),
                mean.as_ptr(),
                logvar.as_ptr(),
                cn,
                ch,
                cw,
                seed,
                z.as_mut_ptr(),
            )
        })
    }

    /// [`sample`](Model::sample) writing `z` over `mean` (the C API allows `z == mean`),
    /// saving one latent-sized buffer.
    pub fn sample_in_place(
        &self,
        mean_to_z: &mut [f32],
        logvar: &[f32],
        n: usize,
        lat_h: usize,
        lat_w: usize,
        seed: u64,
    ) -> Result<()> {
        let op = "klvae sample";
        let (cn, ch, cw) = self.latent_dims(op, n, lat_h, lat_w)?;
        let shape = [n, self.latent_channels(), lat_h, lat_w];
        let names = ["n", "latent_channels", "lat_h", "lat_w"];
        check_len(op, "mean", mean_to_z.len(), &shape, &names)?;
        check_len(op, "logvar", logvar.len(), &shape, &names)?;
        let p = mean_to_z.as_mut_ptr();
        check(unsafe {
            sys::klvae_sample(self.raw.as_ptr(), p, logvar.as_ptr(), cn, ch, cw, seed, p)
        })
    }

    /// Decodes latents `(n, latent_channels, lat_h, lat_w)` into images
    /// `(n, out_channels, lat_h * f, lat_w * f)`, not clamped (nominally [-1, 1]).
    pub fn decode(&self, z: &[f32], n: usize, lat_h: usize, lat_w: usize) -> Result<Vec<f32>> {
        let f = self.downsampling_factor();
        let len = product(
            "klvae decode",
            &[
                n,
                self.out_channels(),
                lat_h.saturating_mul(f),
                lat_w.saturating_mul(f),
            ],
        )?;
        let mut images = vec![0f32; len];
        self.decode_into(z, n, lat_h, lat_w, &mut images)?;
        Ok(images)
    }

    /// [`decode`](Model::decode) into a caller slice.
    pub fn decode_into(
        &self,
        z: &[f32],
        n: usize,
        lat_h: usize,
        lat_w: usize,
        images: &mut [f32],
    ) -> Result<()> {
        let op = "klvae decode";
        let (cn, ch, cw) = self.latent_dims(op, n, lat_h, lat_w)?;
        let f = self.downsampling_factor();
        check_len(
            op,
            "z",
            z.len(),
            &[n, self.latent_channels(), lat_h, lat_w],
            &["n", "latent_channels", "lat_h", "lat_w"],
        )?;
        check_len(
            op,
            "images",
            images.len(),
            &[n, self.out_channels(), lat_h * f, lat_w * f],
            &["n", "out_channels", "lat_h * f", "lat_w * f"],
        )?;
        check(unsafe {
            sys::klvae_decode(
                self.raw.as_ptr(),
                z.as_ptr(),
                cn,
                ch,
                cw,
                images.as_mut_ptr(),
            )
        })
    }

    /// Checks latent sizes: positive, within `int`, and with image sides within `int`.
    fn latent_dims(
        &self,
        op: &str,
        n: usize,
        lat_h: usize,
        lat_w: usize,
    ) -> Result<(c_int, c_int, c_int)> {
        let f = self.downsampling_factor();
        let dims = (
            c_dim(op, "n", n)?,
            c_dim(op, "lat_h", lat_h)?,
            c_dim(op, "lat_w", lat_w)?,
        );
        c_dim(op, "lat_h * f", lat_h.saturating_mul(f))?;
        c_dim(op, "lat_w * f", lat_w.saturating_mul(f))?;
        Ok(dims)
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        unsafe { sys::klvae_model_free(self.raw.as_ptr()) };
    }
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("in_channels", &self.in_channels())
            .field("out_channels", &self.out_channels())
            .field("latent_channels", &self.latent_channels())
            .field("downsampling_factor", &self.downsampling_factor())
            .field("parameter_count", &self.parameter_count())
            .field("backend", &self.backend())
            .finish()
    }
}

/* ------------------------------------------------------------------------ */
/* Training                                                                  */
/* ------------------------------------------------------------------------ */

/// What one training step did (`klvae_step_stats_t`; see docs/training.md).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// The optimizer step just made, from 0.
    pub step: u64,
    /// nll + kl_weight kl + d_weight f g.
    pub total_loss: f64,
    /// Mean over pixels of the weighted pixel and LPIPS terms.
    pub rec_loss: f64,
    /// Mean LPIPS over the batch (unweighted; 0 without LPIPS).
    pub perceptual_loss: f64,
    /// The negative log-likelihood term.
    pub nll_loss: f64,
    /// KL divergence summed per image, batch mean (unweighted).
    pub kl_loss: f64,
    /// -mean D(x') (0 while the GAN is off).
    pub g_loss: f64,
    /// The adaptive generator weight, disc_weight included.
    pub d_weight: f64,
    /// The GAN factor f (0 before disc_start).
    pub disc_factor: f64,
    /// The discriminator loss, f included.
    pub d_loss: f64,
    /// Mean D(x) in the discriminator step.
    pub logits_real: f64,
    /// Mean D(x') in the discriminator step.
    pub logits_fake: f64,
    /// The loss' log-variance.
    pub logvar: f64,
    /// Wall time of the step.
    pub seconds: f64,
    /// This call made no update: a non-finite value, with `nonfinite=skip`.
    pub skipped: bool,
    /// Steps skipped so far for non-finite values (kept in checkpoints).
    pub skipped_steps: u64,
}

impl StepStats {
    fn from_sys(s: &sys::klvae_step_stats_t) -> StepStats {
        StepStats {
            step: s.step as u64,
            total_loss: s.total_loss,
            rec_loss: s.rec_loss,
            perceptual_loss: s.perceptual_loss,
            nll_loss: s.nll_loss,
            kl_loss: s.kl_loss,
            g_loss: s.g_loss,
            d_weight: s.d_weight,
            disc_factor: s.disc_factor,
            d_loss: s.d_loss,
            logits_real: s.logits_real,
            logits_fake: s.logits_fake,
            logvar: s.logvar,
            seconds: s.seconds,
            skipped: s.skipped != 0,
            skipped_steps: s.skipped_steps as u64,
        }
    }

    /// Every value except the wall time, as bit patterns: equal for two steps that computed
    /// exactly the same thing (a resumed run on the CPU).
    pub fn loss_bits(&self) -> [u64; 13] {
        [
            self.step,
            self.total_loss.to_bits(),
            self.rec_loss.to_bits(),
            self.perceptual_loss.to_bits(),
            self.nll_loss.to_bits(),
            self.kl_loss.to_bits(),
            self.g_loss.to_bits(),
            self.d_weight.to_bits(),
            self.disc_factor.to_bits(),
            self.d_loss.to_bits(),
            self.logits_real.to_bits(),
            self.logits_fake.to_bits(),
            self.logvar.to_bits(),
        ]
    }
}

/// The LDM training loop's state for one model: gradients, both Adam states, the
/// discriminator, LPIPS, EMA weights, notes.
///
/// It borrows its [`Model`] mutably for its whole life, so the model outlives it and
/// nothing else touches the model meanwhile; [`Trainer::model`] lends the model out
/// between steps for `encode`/`decode`. `Send`, not `Sync`, like the model.
pub struct Trainer<'m> {
    raw: NonNull<sys::klvae_trainer_t>,
    model: &'m mut Model,
}

// Moving a trainer moves the exclusive borrow of its model with it.
unsafe impl Send for Trainer<'_> {}

impl<'m> Trainer<'m> {
    /// A trainer for `model` with the trainer keys of `opts` (docs/options.md, trainer
    /// group; `seed` too).
    pub fn new(model: &'m mut Model, opts: &Options) -> Result<Trainer<'m>> {
        let mut raw = ptr::null_mut();
        check(unsafe { sys::klvae_trainer_create(model.raw.as_ptr(), opts.as_ptr(), &mut raw) })?;
        let raw = NonNull::new(raw).expect("libklvae returned KLVAE_OK and a NULL trainer");
        Ok(Trainer { raw, model })
    }

    /// The model being trained, for `encode`/`decode`/`save` between steps.
    pub fn model(&self) -> &Model {
        self.model
    }

    /// One optimizer step on `n` images `(n, in_channels, h, w)` in [-1, 1]: `h`, `w`
    /// multiples of the downsampling factor and at least 16 (24 with the default
    /// discriminator), `n` divisible by `grad_accum`. After an error the weights may be
    /// partly updated: reload a checkpoint to continue.
    pub fn step(&mut self, images: &[f32], n: usize, h: usize, w: usize) -> Result<StepStats> {
        let op = "klvae trainer step";
        let f = self.model.downsampling_factor();
        let (cn, ch, cw) = (
            c_dim(op, "n", n)?,
            check_side(op, "h", h, f)?,
            check_side(op, "w", w, f)?,
        );
        check_len(
            op,
            "images",
            images.len(),
            &[n, self.model.in_channels(), h, w],
            &["n", "in_channels", "h", "w"],
        )?;
        let mut stats = sys::klvae_step_stats_t::new();
        check(unsafe {
            sys::klvae_trainer_step(self.raw.as_ptr(), images.as_ptr(), cn, ch, cw, &mut stats)
        })?;
        Ok(StepStats::from_sys(&stats))
    }

    /// Writes a checkpoint (one safetensors file with everything a resume needs), to a
    /// temporary name first: a failure leaves an earlier checkpoint intact.
    pub fn save<P: AsRef<Path>>(&self, path: P) -> Result<()> {
        let path = c_path(path.as_ref())?;
        check(unsafe { sys::klvae_trainer_save(self.raw.as_ptr(), path.as_ptr()) })
    }

    /// Resumes from a checkpoint of a trainer with the same model architecture and
    /// discriminator: training continues exactly (on the CPU, bit for bit). On error the
    /// trainer is unchanged.
    pub fn load<P: AsRef<Path>>(&mut self, path: P) -> Result<()> {
        let path = c_path(path.as_ref())?;
        check(unsafe { sys::klvae_trainer_load(self.raw.as_ptr(), path.as_ptr()) })
    }

    /// Writes the trained autoencoder as a diffusers folder: the EMA weights when `ema`
    /// (needs `ema_decay` > 0), else the current weights.
    pub fn export<P: AsRef<Path>>(&self, path: P, ema: bool) -> Result<()> {
        let path = c_path(path.as_ref())?;
        check(unsafe { sys::klvae_trainer_export(self.raw.as_ptr(), path.as_ptr(), ema as c_int) })
    }

    /// Optimizer steps made so far (after a load: those of the checkpoint).
    pub fn step_count(&self) -> u64 {
        unsafe { sys::klvae_trainer_step_count(self.raw.as_ptr()) as u64 }
    }

    /// The value the trainer uses for a trainer key, after presets and defaults.
    pub fn get(&self, key: &str) -> Result<String> {
        let key = c_string("key", key)?;
        get_string(|buf, size| unsafe {
            sys::klvae_trainer_get(self.raw.as_ptr(), key.as_ptr(), buf, size)
        })
    }

    /// Stores a note (key and value 1 to 255 bytes, at most 32 notes) that checkpoints
    /// carry and [`load`](Trainer::load) restores.
    pub fn set_note(&mut self, key: &str, value: &str) -> Result<()> {
        let key = c_string("note key", key)?;
        let value = c_string("note value", value)?;
        check(unsafe {
            sys::klvae_trainer_set_note(self.raw.as_ptr(), key.as_ptr(), value.as_ptr())
        })
    }

    /// A note's value; a missing key is [`Status::Option`].
    pub fn get_note(&self, key: &str) -> Result<String> {
        let key = c_string("note key", key)?;
        get_string(|buf, size| unsafe {
            sys::klvae_trainer_get_note(self.raw.as_ptr(), key.as_ptr(), buf, size)
        })
    }

    /// The C handle, for use with [`sys`]. It stays owned by this `Trainer`.
    pub fn as_ptr(&self) -> *mut sys::klvae_trainer_t {
        self.raw.as_ptr()
    }
}

impl Drop for Trainer<'_> {
    fn drop(&mut self) {
        // Frees the trainer, not the model (which the borrow keeps alive until now).
        unsafe { sys::klvae_trainer_free(self.raw.as_ptr()) };
    }
}

impl fmt::Debug for Trainer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trainer")
            .field("step_count", &self.step_count())
            .field("model", &self.model)
            .finish()
    }
}

/* ------------------------------------------------------------------------ */
/* Images                                                                    */
/* ------------------------------------------------------------------------ */

/// An RGB image `(3, height, width)`, values in [-1, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// `3 * height * width` floats, channel-major (NCHW without the N).
    pub pixels: Vec<f32>,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

/// Reads a PNG (any bit depth; grey, palette, alpha become RGB) or JPEG file, recognised
/// from its first bytes.
pub fn read_image<P: AsRef<Path>>(path: P) -> Result<Image> {
    let path = c_path(path.as_ref())?;
    let mut pixels: *mut f32 = ptr::null_mut();
    let (mut h, mut w): (c_int, c_int) = (0, 0);
    check(unsafe { sys::klvae_image_read(path.as_ptr(), &mut pixels, &mut h, &mut w) })?;
    let (height, width) = (h as usize, w as usize);
    // Copy into a Vec and hand the library's allocation back to klvae_free.
    let data = unsafe { std::slice::from_raw_parts(pixels, 3 * height * width) }.to_vec();
    unsafe { sys::klvae_free(pixels as *mut std::os::raw::c_void) };
    Ok(Image {
        pixels: data,
        height,
        width,
    })
}

/// Writes a `(3, height, width)` image with values in [-1, 1] as an 8-bit RGB PNG
/// (`round(255 * clamp(v * 0.5 + 0.5, 0, 1))`, NaN as 0), to a temporary name first.
pub fn write_png<P: AsRef<Path>>(
    path: P,
    pixels: &[f32],
    height: usize,
    width: usize,
) -> Result<()> {
    let op = "klvae write_png";
    let (ch, cw) = (c_dim(op, "height", height)?, c_dim(op, "width", width)?);
    check_len(
        op,
        "pixels",
        pixels.len(),
        &[3, height, width],
        &["channels", "height", "width"],
    )?;
    let path = c_path(path.as_ref())?;
    check(unsafe { sys::klvae_image_write_png(path.as_ptr(), pixels.as_ptr(), ch, cw) })
}

impl Image {
    /// Writes this image as an 8-bit RGB PNG (see [`write_png`]).
    pub fn write_png<P: AsRef<Path>>(&self, path: P) -> Result<()> {
        write_png(path, &self.pixels, self.height, self.width)
    }
}
