//! The bindings against the committed fixture models (../../tests/fixtures): inference,
//! sampling, created models, errors, training with checkpoints, images, threads.

use std::ffi::CStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use klvae::{Error, Model, Options, Status, Trainer};

/* ---- helpers ---- */

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A diffusers folder with downsampling factor 8 (four blocks of 8,16,16,16 channels).
fn f8_model_path() -> PathBuf {
    fixtures().join("noquant/diffusers")
}

/// One worker thread per model: the tests run in parallel and the machine is small.
fn one_thread() -> Options {
    Options::from_pairs(&[("threads", "1")]).unwrap()
}

fn tiny_options(seed: u64) -> Options {
    Options::from_pairs(&[("config", "tiny"), ("threads", "1")])
        .unwrap()
        .with("seed", seed)
        .unwrap()
}

/// Deterministic pseudo-random values in [-1, 1).
fn pseudo_random(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A smooth test picture (3, h, w) in [-1, 1].
fn picture(h: usize, w: usize) -> Vec<f32> {
    let mut x = Vec::with_capacity(3 * h * w);
    for c in 0..3 {
        for i in 0..h {
            for j in 0..w {
                let v = ((i as f32 * 0.3 + c as f32).sin() * (j as f32 * 0.2).cos()) * 0.8;
                x.push(v);
            }
        }
    }
    x
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(klvae::sys::klvae_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A fresh folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "klvae-rust-{}-{}-{}",
            tag,
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn assert_status<T: std::fmt::Debug>(result: Result<T, Error>, status: Status) -> Error {
    let err = result.expect_err("expected an error");
    assert_eq!(
        err.status, status,
        "unexpected status, message: {}",
        err.message
    );
    assert!(!err.message.is_empty(), "empty message for {:?}", status);
    err
}

/* ---- version, status, errors ---- */

#[test]
fn library_version_matches_the_bindings() {
    let (major, minor, patch) = klvae::version();
    assert!(
        klvae::version_compatible(),
        "libklvae {} for bindings of 0.1",
        klvae::version_string()
    );
    assert_eq!(major, klvae::sys::KLVAE_VERSION_MAJOR);
    assert!(minor >= klvae::sys::KLVAE_VERSION_MINOR);
    assert_eq!(
        klvae::version_string(),
        format!("{}.{}.{}", major, minor, patch)
    );
}

#[test]
fn status_codes_round_trip_and_unknown_codes_survive() {
    assert_eq!(Status::from_code(0), None);
    for code in 1..=12 {
        let status = Status::from_code(code).unwrap();
        assert!(
            !matches!(status, Status::Unknown(_)),
            "code {} unknown",
            code
        );
        assert_eq!(status.code(), code);
        assert_ne!(status.description(), "unknown status");
    }
    assert_eq!(Status::from_code(99), Some(Status::Unknown(99)));
    assert_eq!(Status::Unknown(99).description(), "unknown status");
    assert_eq!(Status::InvalidArgument.to_string(), "invalid argument");

    let err = Error::new(Status::Io, "cannot open x");
    assert_eq!(
        err.to_string(),
        format!("cannot open x ({})", Status::Io.description())
    );
    let boxed: Box<dyn std::error::Error> = Box::new(err);
    assert!(boxed.to_string().starts_with("cannot open x"));
}

/* ---- inference with a fixture model (f = 8) ---- */

#[test]
fn fixture_model_reports_its_config() {
    let model = Model::load(f8_model_path(), &one_thread()).unwrap();
    assert_eq!(model.in_channels(), 3);
    assert_eq!(model.out_channels(), 3);
    assert_eq!(model.latent_channels(), 4);
    assert_eq!(model.downsampling_factor(), 8);
    assert_eq!(model.scaling_factor(), 0.18215);
    assert_eq!(model.shift_factor(), 0.0);
    assert!(model.parameter_count() > 0);
    assert_eq!(model.backend(), "cpu");
    assert_eq!(model.get("block_out_channels").unwrap(), "8,16,16,16");
    assert_eq!(model.get("block-out-channels").unwrap(), "8,16,16,16");
    assert_eq!(model.get("shift_factor").unwrap(), "none");
    assert_eq!(model.get("use_quant_conv").unwrap(), "false");
    assert_eq!(model.get("threads").unwrap(), "1");
    let err = assert_status(model.get("config"), Status::Option);
    assert!(err.message.contains("config"), "{}", err.message);
    assert!(format!("{:?}", model).contains("latent_channels: 4"));
}

#[test]
fn encode_then_decode_has_the_documented_shapes() {
    let model = Model::load(f8_model_path(), &one_thread()).unwrap();
    let (n, h, w) = (2, 16, 24);
    let mut images = picture(h, w);
    images.extend(pseudo_random(3 * h * w, 1));
    let (mean, logvar) = model.encode(&images, n, h, w).unwrap();
    assert_eq!(mean.len(), n * 4 * (h / 8) * (w / 8));
    assert_eq!(logvar.len(), mean.len());
    assert_eq!(model.latent_len(n, h, w).unwrap(), mean.len());
    assert!(mean.iter().chain(&logvar).all(|v| v.is_finite()));
    assert!(logvar.iter().all(|&v| (-30.0..=20.0).contains(&v)));

    // Into caller slices, without logvar: the same mean.
    let mut mean2 = vec![0f32; mean.len()];
    model
        .encode_into(&images, n, h, w, &mut mean2, None)
        .unwrap();
    assert_eq!(bits(&mean), bits(&mean2));

    let decoded = model.decode(&mean, n, h / 8, w / 8).unwrap();
    assert_eq!(decoded.len(), n * 3 * h * w);
    assert!(decoded.iter().all(|v| v.is_finite()));
    let mut decoded2 = vec![0f32; decoded.len()];
    model
        .decode_into(&mean, n, h / 8, w / 8, &mut decoded2)
        .unwrap();
    assert_eq!(bits(&decoded), bits(&decoded2));
}

#[test]
fn sampling_is_deterministic_per_seed() {
    let model = Model::load(f8_model_path(), &one_thread()).unwrap();
    let (n, h, w) = (1, 16, 16);
    let (mean, logvar) = model.encode(&picture(h, w), n, h, w).unwrap();
    let z1 = model.sample(&mean, &logvar, n, 2, 2, 42).unwrap();
    let z2 = model.sample(&mean, &logvar, n, 2, 2, 42).unwrap();
    let z3 = model.sample(&mean, &logvar, n, 2, 2, 43).unwrap();
    assert_eq!(bits(&z1), bits(&z2));
    assert_ne!(bits(&z1), bits(&z3));
    assert_ne!(bits(&z1), bits(&mean));

    let mut in_place = mean.clone();
    model
        .sample_in_place(&mut in_place, &logvar, n, 2, 2, 42)
        .unwrap();
    assert_eq!(bits(&z1), bits(&in_place));
    let mut z4 = vec![0f32; mean.len()];
    model
        .sample_into(&mean, &logvar, n, 2, 2, 42, &mut z4)
        .unwrap();
    assert_eq!(bits(&z1), bits(&z4));
}

#[test]
fn a_model_moves_to_another_thread() {
    fn send<T: Send>() {}
    send::<Model>();
    send::<Options>();
    send::<Trainer<'static>>();

    let model = Model::load(f8_model_path(), &one_thread()).unwrap();
    let x = picture(16, 16);
    let (here, _) = model.encode(&x, 1, 16, 16).unwrap();
    let there = std::thread::spawn(move || model.encode(&x, 1, 16, 16).unwrap().0)
        .join()
        .unwrap();
    assert_eq!(bits(&here), bits(&there));
}

/* ---- created models ---- */

#[test]
fn tiny_created_model_is_seeded_and_saves() {
    let a = Model::create(&tiny_options(1)).unwrap();
    let b = Model::create(&tiny_options(1)).unwrap();
    let c = Model::create(&tiny_options(2)).unwrap();
    assert_eq!(a.get("block_out_channels").unwrap(), "16,32");
    assert_eq!(a.downsampling_factor(), 2);
    assert_eq!(a.parameter_count(), b.parameter_count());

    let x = picture(8, 8);
    let (ma, la) = a.encode(&x, 1, 8, 8).unwrap();
    let (mb, lb) = b.encode(&x, 1, 8, 8).unwrap();
    let (mc, _) = c.encode(&x, 1, 8, 8).unwrap();
    assert_eq!(ma.len(), 4 * 4 * 4);
    assert_eq!(bits(&ma), bits(&mb));
    assert_eq!(bits(&la), bits(&lb));
    assert_ne!(bits(&ma), bits(&mc));

    let dir = TempDir::new("save");
    let folder = dir.join("tiny");
    a.save(&folder).unwrap();
    assert!(folder.join("config.json").is_file());
    assert!(folder.join("diffusion_pytorch_model.safetensors").is_file());
    let loaded = Model::load(&folder, &one_thread()).unwrap();
    assert_eq!(loaded.parameter_count(), a.parameter_count());
    let (ml, _) = loaded.encode(&x, 1, 8, 8).unwrap();
    assert_eq!(bits(&ma), bits(&ml));
    let za = a.decode(&ma, 1, 4, 4).unwrap();
    let zl = loaded.decode(&ma, 1, 4, 4).unwrap();
    assert_eq!(bits(&za), bits(&zl));
}

/* ---- errors ---- */

#[test]
fn missing_file_is_an_io_error_naming_the_path() {
    let missing = fixtures().join("no-such-model-here");
    let err = assert_status(Model::load(&missing, &one_thread()), Status::Io);
    assert!(
        err.message.contains("no-such-model-here"),
        "message: {}",
        err.message
    );
    assert!(err.to_string().contains("no-such-model-here"));

    let err = assert_status(klvae::read_image(missing.join("x.png")), Status::Io);
    assert!(
        err.message.contains("no-such-model-here"),
        "message: {}",
        err.message
    );
}

#[test]
fn bad_options_are_option_errors_naming_the_key() {
    let mut opts = Options::new();
    let err = assert_status(opts.set("no_such_key", "1").map(|_| ()), Status::Option);
    assert!(
        err.message.contains("no_such_key"),
        "message: {}",
        err.message
    );
    let err = assert_status(opts.set("threads", "many").map(|_| ()), Status::Option);
    assert!(
        err.message.contains("threads") && err.message.contains("many"),
        "{}",
        err.message
    );
    assert_status(
        Options::from_pairs(&[("latent_channels", "0")]),
        Status::Option,
    );
    // A refused value leaves the object unchanged; get gives set values and defaults.
    assert_eq!(opts.get("threads").unwrap(), "0");
    opts.set("threads", 2).unwrap().set("seed", "9").unwrap();
    assert_eq!(opts.get("threads").unwrap(), "2");
    assert_eq!(opts.get("config").unwrap(), "sd");
    assert_eq!(
        Options::new().get("block_out_channels").unwrap(),
        "128,256,512,512"
    );
    assert_status(Options::new().get("nope"), Status::Option);
    // A NUL byte cannot reach C.
    assert_status(
        opts.set("thr\0eads", "1").map(|_| ()),
        Status::InvalidArgument,
    );

    let keys = klvae::option_descriptions();
    assert!(keys
        .iter()
        .any(|k| k.key == "threads" && k.default == "0" && !k.help.is_empty()));
    assert!(keys.iter().any(|k| k.key == "ema_decay"));

    // An option the model disagrees with.
    let opts = Options::from_pairs(&[("latent_channels", "16")]).unwrap();
    assert_status(Model::load(f8_model_path(), &opts), Status::Config);
}

#[test]
fn wrong_lengths_and_sizes_fail_in_rust_before_calling_c() {
    let model = Model::load(f8_model_path(), &one_thread()).unwrap();
    // Leave a known message in the C library's thread-local last error first: a check
    // made in Rust must not call C, which would replace it.
    assert_status(
        Options::new().set("no_such_key", "1").map(|_| ()),
        Status::Option,
    );
    let before = last_error();
    assert!(before.contains("no_such_key"));

    let images = vec![0f32; 3 * 16 * 16 - 1];
    let err = assert_status(model.encode(&images, 1, 16, 16), Status::InvalidArgument);
    assert!(
        err.message.contains("images") && err.message.contains("768"),
        "{}",
        err.message
    );
    let err = assert_status(
        model.encode(&vec![0f32; 3 * 12 * 16], 1, 12, 16),
        Status::InvalidArgument,
    );
    assert!(err.message.contains("multiple"), "{}", err.message);
    assert_status(model.encode(&[], 0, 16, 16), Status::InvalidArgument);
    let ok_images = vec![0f32; 3 * 16 * 16];
    let mut mean = vec![0f32; 4 * 2 * 2];
    let mut short = vec![0f32; 4 * 2 * 2 - 1];
    assert_status(
        model.encode_into(&ok_images, 1, 16, 16, &mut short, None),
        Status::InvalidArgument,
    );
    let err = assert_status(
        model.encode_into(&ok_images, 1, 16, 16, &mut mean, Some(&mut short)),
        Status::InvalidArgument,
    );
    assert!(err.message.contains("logvar"), "{}", err.message);

    let z = vec![0f32; 4 * 2 * 2];
    assert_status(
        model.sample(&z, &z[1..], 1, 2, 2, 0),
        Status::InvalidArgument,
    );
    assert_status(model.decode(&z, 1, 2, 3), Status::InvalidArgument);
    let mut out = vec![0f32; 3 * 16 * 16 + 1];
    let err = assert_status(
        model.decode_into(&z, 1, 2, 2, &mut out),
        Status::InvalidArgument,
    );
    assert!(err.message.contains("images"), "{}", err.message);
    assert_status(
        model.decode(&z, 1, usize::MAX / 4, 1),
        Status::InvalidArgument,
    );
    assert_status(
        klvae::write_png("/nonexistent/x.png", &[0.0; 11], 2, 2),
        Status::InvalidArgument,
    );

    assert_eq!(last_error(), before, "a Rust-side check called into C");
}

/* ---- training ---- */

fn trainer_options() -> Options {
    Options::from_pairs(&[
        ("config", "tiny"),
        ("threads", "1"),
        ("seed", "3"),
        ("learning_rate", "1e-3"),
        ("disc_channels", "8"),
        ("disc_start", "1"),
        ("ema_decay", "0.9"),
    ])
    .unwrap()
}

fn training_batch(step: u64) -> Vec<f32> {
    pseudo_random(2 * 3 * 32 * 32, 100 + step)
}

#[test]
fn trainer_steps_resumes_bit_for_bit_and_exports() {
    let dir = TempDir::new("train");
    let ckpt = dir.join("run.ckpt");
    let opts = trainer_options();

    let mut model = Model::create(&opts).unwrap();
    let mut trainer = model.trainer(&opts).unwrap();
    assert_eq!(trainer.step_count(), 0);
    assert_eq!(trainer.get("ema_decay").unwrap(), "0.9");
    assert_eq!(trainer.get("perceptual_weight").unwrap(), "0"); // no LPIPS weights given
    for k in 0..2 {
        let stats = trainer.step(&training_batch(k), 2, 32, 32).unwrap();
        assert_eq!(stats.step, k);
        for v in [
            stats.total_loss,
            stats.rec_loss,
            stats.nll_loss,
            stats.kl_loss,
            stats.g_loss,
            stats.d_loss,
        ] {
            assert!(v.is_finite(), "step {}: {:?}", k, stats);
        }
        assert!(stats.rec_loss > 0.0);
    }
    assert_eq!(trainer.step_count(), 2);
    trainer.set_note("data_position", "17").unwrap();
    trainer.save(&ckpt).unwrap();

    // Encode and decode between steps, through the trainer's borrow of the model.
    let (mean, _) = trainer.model().encode(&picture(32, 32), 1, 32, 32).unwrap();
    assert_eq!(mean.len(), 4 * 16 * 16);

    let third = trainer.step(&training_batch(2), 2, 32, 32).unwrap();
    assert_eq!(third.step, 2);

    // A new model and trainer resumed from the checkpoint make the same third step.
    let mut model2 = Model::create(&tiny_options(99)).unwrap();
    let mut resumed = Trainer::new(&mut model2, &opts).unwrap();
    resumed.load(&ckpt).unwrap();
    assert_eq!(resumed.step_count(), 2);
    assert_eq!(resumed.get_note("data_position").unwrap(), "17");
    let again = resumed.step(&training_batch(2), 2, 32, 32).unwrap();
    assert_eq!(
        again.loss_bits(),
        third.loss_bits(),
        "\n{:?}\n{:?}",
        again,
        third
    );

    // Both trainers now hold the same weights; export them and load them back.
    let current = dir.join("current");
    let ema = dir.join("ema");
    trainer.export(&current, false).unwrap();
    resumed.export(&ema, true).unwrap();
    let x = picture(32, 32);
    let (m_trained, _) = trainer.model().encode(&x, 1, 32, 32).unwrap();
    let (m_resumed, _) = resumed.model().encode(&x, 1, 32, 32).unwrap();
    assert_eq!(bits(&m_trained), bits(&m_resumed));
    drop(trainer);
    drop(resumed);

    let exported = Model::load(&current, &one_thread()).unwrap();
    assert_eq!(exported.parameter_count(), model.parameter_count());
    let (m_exported, _) = exported.encode(&x, 1, 32, 32).unwrap();
    assert_eq!(bits(&m_exported), bits(&m_trained));
    // The trainer is gone: the model is ours again, with the trained weights.
    assert_eq!(
        bits(&model.encode(&x, 1, 32, 32).unwrap().0),
        bits(&m_trained)
    );
    let averaged = Model::load(&ema, &one_thread()).unwrap();
    let (m_ema, _) = averaged.encode(&x, 1, 32, 32).unwrap();
    assert_eq!(m_ema.len(), m_trained.len());
    assert_ne!(bits(&m_ema), bits(&m_trained));
}

#[test]
fn trainer_errors_have_their_statuses() {
    let opts = Options::from_pairs(&[("config", "tiny"), ("threads", "1"), ("disc_channels", "8")])
        .unwrap();
    let mut model = Model::create(&opts).unwrap();
    let mut trainer = model.trainer(&opts).unwrap();
    let dir = TempDir::new("train-errors");

    // EMA export without ema_decay.
    let err = assert_status(
        trainer.export(dir.join("ema"), true),
        Status::InvalidArgument,
    );
    assert!(err.message.contains("ema_decay"), "{}", err.message);
    assert_status(trainer.get_note("missing"), Status::Option);
    assert_status(trainer.get("block_out_channels_typo"), Status::Option);
    let err = assert_status(trainer.load(dir.join("none.ckpt")), Status::Io);
    assert!(err.message.contains("none.ckpt"), "{}", err.message);
    assert_status(
        trainer.load(fixtures().join("train/disc.safetensors")),
        Status::Format,
    );
    // Too small for LPIPS and the discriminator: refused by C.
    assert_status(
        trainer.step(&vec![0f32; 3 * 8 * 8], 1, 8, 8),
        Status::InvalidArgument,
    );
    // Wrong length: refused in Rust.
    let err = assert_status(
        trainer.step(&[0f32; 10], 1, 32, 32),
        Status::InvalidArgument,
    );
    assert!(err.message.contains("images"), "{}", err.message);
    assert_eq!(trainer.step_count(), 0);

    // Invalid trainer options.
    let bad = Options::from_pairs(&[("disc_layers", "9")]);
    assert_status(bad, Status::Option);
}

/* ---- images ---- */

#[test]
fn png_round_trip_quantises_to_8_bits() {
    let dir = TempDir::new("png");
    let path = dir.join("picture.png");
    let (h, w) = (12, 20);
    let pixels = picture(h, w);
    klvae::write_png(&path, &pixels, h, w).unwrap();
    let image = klvae::read_image(&path).unwrap();
    assert_eq!((image.height, image.width), (h, w));
    assert_eq!(image.pixels.len(), 3 * h * w);
    for (a, b) in pixels.iter().zip(&image.pixels) {
        assert!((a - b).abs() <= 1.0 / 255.0 + 1e-6, "{} vs {}", a, b);
    }
    image.write_png(dir.join("again.png")).unwrap();
    assert_eq!(klvae::read_image(dir.join("again.png")).unwrap(), image);

    fs::write(dir.join("not.png"), b"hello").unwrap();
    assert_status(klvae::read_image(dir.join("not.png")), Status::Format);
}
