//! The raw C API of `include/klvae.h` (libklvae 0.1), one declaration per C declaration.
//!
//! Everything here is `unsafe` to call and follows the header's contract word for word;
//! the header is the manual. Use the safe wrappers in the crate root unless you need
//! something they do not offer.
//!
//! `klvae_status_t` is a plain `c_int` here, not a Rust `enum`: the header promises that
//! status numbers are "only ever appended to", and a newer library returning a value that
//! a Rust `enum` does not list would be undefined behaviour.

#![allow(non_camel_case_types)]
// Each item mirrors a declaration of include/klvae.h, whose comments are its documentation.
#![allow(missing_docs)]

use std::marker::{PhantomData, PhantomPinned};
use std::os::raw::{c_char, c_int, c_uint, c_void};

/* ---- version ---- */

/// The header version these declarations were written from.
pub const KLVAE_VERSION_MAJOR: c_uint = 0;
pub const KLVAE_VERSION_MINOR: c_uint = 2;
pub const KLVAE_VERSION_PATCH: c_uint = 0;
pub const KLVAE_VERSION_NUMBER: c_uint =
    KLVAE_VERSION_MAJOR * 10000 + KLVAE_VERSION_MINOR * 100 + KLVAE_VERSION_PATCH;
pub const KLVAE_VERSION_STRING: &str = "0.2.0";

/* ---- status codes ---- */

/// `enum klvae_status` (an `int`-sized C enum).
pub type klvae_status_t = c_int;
pub const KLVAE_OK: klvae_status_t = 0;
pub const KLVAE_ERR_INVALID_ARGUMENT: klvae_status_t = 1;
pub const KLVAE_ERR_OUT_OF_MEMORY: klvae_status_t = 2;
pub const KLVAE_ERR_IO: klvae_status_t = 3;
pub const KLVAE_ERR_FORMAT: klvae_status_t = 4;
pub const KLVAE_ERR_SHAPE: klvae_status_t = 5;
pub const KLVAE_ERR_MISSING_TENSOR: klvae_status_t = 6;
pub const KLVAE_ERR_CONFIG: klvae_status_t = 7;
pub const KLVAE_ERR_OPTION: klvae_status_t = 8;
pub const KLVAE_ERR_UNSUPPORTED: klvae_status_t = 9;
pub const KLVAE_ERR_BACKEND_UNAVAILABLE: klvae_status_t = 10;
pub const KLVAE_ERR_BACKEND: klvae_status_t = 11;
pub const KLVAE_ERR_INTERNAL: klvae_status_t = 12;
pub const KLVAE_ERR_NONFINITE: klvae_status_t = 13;
pub const KLVAE_ERR_BUSY: klvae_status_t = 14;
pub const KLVAE_ERR_BUFFER_TOO_SMALL: klvae_status_t = 15;
pub const KLVAE_ERR_COMM: klvae_status_t = 16;

/* ---- opaque handles ---- */

/// `klvae_options_t`: only ever used behind a pointer. Not `Send`, not `Sync`, not `Unpin`.
#[repr(C)]
pub struct klvae_options_t {
    _private: [u8; 0],
    _marker: PhantomData<(*mut u8, PhantomPinned)>,
}

/// `klvae_model_t`: only ever used behind a pointer.
#[repr(C)]
pub struct klvae_model_t {
    _private: [u8; 0],
    _marker: PhantomData<(*mut u8, PhantomPinned)>,
}

/// `klvae_trainer_t`: only ever used behind a pointer.
#[repr(C)]
pub struct klvae_trainer_t {
    _private: [u8; 0],
    _marker: PhantomData<(*mut u8, PhantomPinned)>,
}

/* ---- training statistics ---- */

/// `klvae_step_stats_t`. Set `struct_size` to `size_of::<klvae_step_stats_t>()` before
/// passing it (`klvae_step_stats_t::new()` does, like `KLVAE_STEP_STATS_INIT`): the library
/// writes only the fields that fit, so later versions can append fields.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct klvae_step_stats_t {
    pub struct_size: u32,
    pub reserved: u32,
    pub step: i64,
    pub total_loss: f64,
    pub rec_loss: f64,
    pub perceptual_loss: f64,
    pub nll_loss: f64,
    pub kl_loss: f64,
    pub g_loss: f64,
    pub d_weight: f64,
    pub disc_factor: f64,
    pub d_loss: f64,
    pub logits_real: f64,
    pub logits_fake: f64,
    pub logvar: f64,
    pub seconds: f64,
    pub skipped: u32,
    pub spare: u32,
    pub skipped_steps: i64,
}

impl klvae_step_stats_t {
    /// `KLVAE_STEP_STATS_INIT`: zeros with `struct_size` set.
    pub const fn new() -> Self {
        klvae_step_stats_t {
            struct_size: std::mem::size_of::<klvae_step_stats_t>() as u32,
            reserved: 0,
            step: 0,
            total_loss: 0.0,
            rec_loss: 0.0,
            perceptual_loss: 0.0,
            nll_loss: 0.0,
            kl_loss: 0.0,
            g_loss: 0.0,
            d_weight: 0.0,
            disc_factor: 0.0,
            d_loss: 0.0,
            logits_real: 0.0,
            logits_fake: 0.0,
            logvar: 0.0,
            seconds: 0.0,
            skipped: 0,
            spare: 0,
            skipped_steps: 0,
        }
    }
}

impl Default for klvae_step_stats_t {
    fn default() -> Self {
        Self::new()
    }
}

// The 0.1 layout: two u32, one i64, thirteen doubles.
const _: () = assert!(std::mem::size_of::<klvae_step_stats_t>() == 136);
const _: () = assert!(std::mem::align_of::<klvae_step_stats_t>() == 8);

/// `klvae_comm_type_t`: the element type of an `allreduce_sum` call.
pub type klvae_comm_type_t = c_int;
pub const KLVAE_COMM_FLOAT32: klvae_comm_type_t = 0;
pub const KLVAE_COMM_FLOAT64: klvae_comm_type_t = 1;

/// `klvae_comm_t`: a data-parallel communicator's ranks and callbacks (klvae.h, "Data-parallel
/// training"). Set `struct_size` to `size_of::<klvae_comm_t>()`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct klvae_comm_t {
    pub struct_size: u32,
    pub rank: c_int,
    pub size: c_int,
    pub ctx: *mut c_void,
    pub allreduce_sum: Option<
        unsafe extern "C" fn(*mut c_void, *mut c_void, usize, klvae_comm_type_t) -> c_int,
    >,
    pub broadcast: Option<unsafe extern "C" fn(*mut c_void, *mut c_void, usize, c_int) -> c_int>,
}

/// `klvae_dataset_progress_t`: what `klvae_encode_dataset` has done. Set `struct_size`
/// (`klvae_dataset_progress_t::new()` does, like `KLVAE_DATASET_PROGRESS_INIT`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct klvae_dataset_progress_t {
    pub struct_size: u32,
    pub reserved: u32,
    pub part: i32,
    pub parts: i32,
    pub images_total: i64,
    pub images_done: i64,
    pub images_skipped: i64,
    pub images_resumed: i64,
    pub shards_total: i64,
    pub shards_done: i64,
    pub seconds: f64,
    pub images_per_second: f64,
    pub eta_seconds: f64,
    pub skipped_path: *const c_char,
    pub skipped_reason: *const c_char,
    pub finished: i32,
    pub dataset_complete: i32,
}

impl klvae_dataset_progress_t {
    /// `KLVAE_DATASET_PROGRESS_INIT`: zeros with `struct_size` set.
    pub const fn new() -> Self {
        klvae_dataset_progress_t {
            struct_size: std::mem::size_of::<klvae_dataset_progress_t>() as u32,
            reserved: 0,
            part: 0,
            parts: 0,
            images_total: 0,
            images_done: 0,
            images_skipped: 0,
            images_resumed: 0,
            shards_total: 0,
            shards_done: 0,
            seconds: 0.0,
            images_per_second: 0.0,
            eta_seconds: 0.0,
            skipped_path: std::ptr::null(),
            skipped_reason: std::ptr::null(),
            finished: 0,
            dataset_complete: 0,
        }
    }
}

impl Default for klvae_dataset_progress_t {
    fn default() -> Self {
        Self::new()
    }
}

// The 0.2 layout: four 32-bit fields, six i64, three doubles, two pointers, two i32.
#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<klvae_dataset_progress_t>() == 112);

/// `klvae_dataset_progress_fn`: a non-zero return stops the run.
pub type klvae_dataset_progress_fn = Option<
    unsafe extern "C" fn(user: *mut c_void, progress: *const klvae_dataset_progress_t) -> c_int,
>;

/* ---- functions ---- */

extern "C" {
    // version
    pub fn klvae_version() -> c_uint;
    pub fn klvae_version_string() -> *const c_char;

    // status codes and errors
    pub fn klvae_status_string(status: klvae_status_t) -> *const c_char;
    pub fn klvae_last_error() -> *const c_char;
    pub fn klvae_last_needed_size() -> usize;
    pub fn klvae_free(ptr: *mut c_void);

    // options
    pub fn klvae_options_create(out: *mut *mut klvae_options_t) -> klvae_status_t;
    pub fn klvae_options_set(
        opts: *mut klvae_options_t,
        key: *const c_char,
        value: *const c_char,
    ) -> klvae_status_t;
    pub fn klvae_options_get(
        opts: *const klvae_options_t,
        key: *const c_char,
        buf: *mut c_char,
        size: usize,
    ) -> klvae_status_t;
    pub fn klvae_options_free(opts: *mut klvae_options_t);
    pub fn klvae_option_describe(
        index: c_int,
        key: *mut *const c_char,
        default_value: *mut *const c_char,
        help: *mut *const c_char,
    ) -> klvae_status_t;

    // models
    pub fn klvae_model_load(
        path: *const c_char,
        opts: *const klvae_options_t,
        out: *mut *mut klvae_model_t,
    ) -> klvae_status_t;
    pub fn klvae_model_create(
        opts: *const klvae_options_t,
        out: *mut *mut klvae_model_t,
    ) -> klvae_status_t;
    pub fn klvae_model_save(model: *const klvae_model_t, path: *const c_char) -> klvae_status_t;
    pub fn klvae_model_free(model: *mut klvae_model_t);
    pub fn klvae_model_in_channels(model: *const klvae_model_t) -> c_int;
    pub fn klvae_model_out_channels(model: *const klvae_model_t) -> c_int;
    pub fn klvae_model_latent_channels(model: *const klvae_model_t) -> c_int;
    pub fn klvae_model_downsampling_factor(model: *const klvae_model_t) -> c_int;
    pub fn klvae_model_scaling_factor(model: *const klvae_model_t) -> f32;
    pub fn klvae_model_shift_factor(model: *const klvae_model_t) -> f32;
    pub fn klvae_model_parameter_count(model: *const klvae_model_t) -> i64;
    pub fn klvae_model_backend(model: *const klvae_model_t) -> *const c_char;
    pub fn klvae_model_get(
        model: *const klvae_model_t,
        key: *const c_char,
        buf: *mut c_char,
        size: usize,
    ) -> klvae_status_t;

    // inference
    pub fn klvae_encode(
        model: *mut klvae_model_t,
        images: *const f32,
        n: c_int,
        h: c_int,
        w: c_int,
        mean: *mut f32,
        logvar: *mut f32,
    ) -> klvae_status_t;
    pub fn klvae_sample(
        model: *mut klvae_model_t,
        mean: *const f32,
        logvar: *const f32,
        n: c_int,
        lat_h: c_int,
        lat_w: c_int,
        seed: u64,
        z: *mut f32,
    ) -> klvae_status_t;
    pub fn klvae_decode(
        model: *mut klvae_model_t,
        z: *const f32,
        n: c_int,
        lat_h: c_int,
        lat_w: c_int,
        images: *mut f32,
    ) -> klvae_status_t;

    // inference on GPU memory (CUDA backend only): every array pointer is device memory on
    // the model's GPU and `stream` is a cudaStream_t (NULL: the model's own stream). Not
    // wrapped safely: Rust cannot check device pointers. A model on the CPU backend answers
    // KLVAE_ERR_INVALID_ARGUMENT.
    pub fn klvae_encode_device(
        model: *mut klvae_model_t,
        images: *const f32,
        n: c_int,
        h: c_int,
        w: c_int,
        mean: *mut f32,
        logvar: *mut f32,
        stream: *mut c_void,
    ) -> klvae_status_t;
    pub fn klvae_decode_device(
        model: *mut klvae_model_t,
        z: *const f32,
        n: c_int,
        lat_h: c_int,
        lat_w: c_int,
        images: *mut f32,
        stream: *mut c_void,
    ) -> klvae_status_t;
    pub fn klvae_sample_device(
        model: *mut klvae_model_t,
        mean: *const f32,
        logvar: *const f32,
        n: c_int,
        lat_h: c_int,
        lat_w: c_int,
        seed: u64,
        z: *mut f32,
        stream: *mut c_void,
    ) -> klvae_status_t;

    // training
    pub fn klvae_trainer_create(
        model: *mut klvae_model_t,
        opts: *const klvae_options_t,
        out: *mut *mut klvae_trainer_t,
    ) -> klvae_status_t;
    pub fn klvae_trainer_step(
        trainer: *mut klvae_trainer_t,
        images: *const f32,
        n: c_int,
        h: c_int,
        w: c_int,
        stats: *mut klvae_step_stats_t,
    ) -> klvae_status_t;
    pub fn klvae_trainer_step_device(
        trainer: *mut klvae_trainer_t,
        images: *const f32,
        n: c_int,
        h: c_int,
        w: c_int,
        stream: *mut c_void,
        stats: *mut klvae_step_stats_t,
    ) -> klvae_status_t;
    pub fn klvae_trainer_save(
        trainer: *const klvae_trainer_t,
        path: *const c_char,
    ) -> klvae_status_t;
    pub fn klvae_trainer_load(trainer: *mut klvae_trainer_t, path: *const c_char)
        -> klvae_status_t;
    pub fn klvae_trainer_export(
        trainer: *const klvae_trainer_t,
        path: *const c_char,
        use_ema: c_int,
    ) -> klvae_status_t;
    pub fn klvae_trainer_step_count(trainer: *const klvae_trainer_t) -> i64;
    pub fn klvae_trainer_get(
        trainer: *const klvae_trainer_t,
        key: *const c_char,
        buf: *mut c_char,
        size: usize,
    ) -> klvae_status_t;
    pub fn klvae_trainer_set_note(
        trainer: *mut klvae_trainer_t,
        key: *const c_char,
        value: *const c_char,
    ) -> klvae_status_t;
    pub fn klvae_trainer_get_note(
        trainer: *const klvae_trainer_t,
        key: *const c_char,
        buf: *mut c_char,
        size: usize,
    ) -> klvae_status_t;
    pub fn klvae_trainer_free(trainer: *mut klvae_trainer_t);
    pub fn klvae_trainer_set_comm(
        trainer: *mut klvae_trainer_t,
        comm: *const klvae_comm_t,
    ) -> klvae_status_t;

    // images
    pub fn klvae_image_read(
        path: *const c_char,
        pixels: *mut *mut f32,
        h: *mut c_int,
        w: *mut c_int,
    ) -> klvae_status_t;
    pub fn klvae_image_read_opts(
        path: *const c_char,
        opts: *const klvae_options_t,
        pixels: *mut *mut f32,
        h: *mut c_int,
        w: *mut c_int,
    ) -> klvae_status_t;
    pub fn klvae_image_write_png(
        path: *const c_char,
        pixels: *const f32,
        h: c_int,
        w: c_int,
    ) -> klvae_status_t;

    // datasets
    pub fn klvae_encode_dataset(
        model: *mut klvae_model_t,
        data: *const c_char,
        out_dir: *const c_char,
        opts: *const klvae_options_t,
        progress: klvae_dataset_progress_fn,
        user: *mut c_void,
        summary: *mut klvae_dataset_progress_t,
    ) -> klvae_status_t;
    pub fn klvae_latent_stats(
        shards_dir: *const c_char,
        capacity: c_int,
        channels: *mut c_int,
        mean: *mut f64,
        std: *mut f64,
        scaling_factor: *mut f64,
        shift_factor: *mut f64,
    ) -> klvae_status_t;
}
