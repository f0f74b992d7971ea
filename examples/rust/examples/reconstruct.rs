//! Encodes an image, decodes the posterior mean, writes the result and prints the PSNR.
//!
//!     cargo run --offline --example reconstruct -- MODEL IN.png OUT.png
//!
//! MODEL is a diffusers folder or a .safetensors file. Any image size works: the image is
//! padded (edge pixels repeated) to a multiple of the downsampling factor and cropped
//! back. The PSNR is computed on 8-bit values, as `klvae reconstruct` does.

use std::process::ExitCode;

use klvae::{Image, Model, Options};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: {} MODEL IN.png OUT.png", args[0]);
        return ExitCode::from(2);
    }
    match run(&args[1], &args[2], &args[3]) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reconstruct: {}", e);
            ExitCode::FAILURE
        }
    }
}

fn run(model_path: &str, input: &str, output: &str) -> Result<(), klvae::Error> {
    let model = Model::load(model_path, &Options::new())?;
    let image = klvae::read_image(input)?;
    let f = model.downsampling_factor();
    let (h, w) = (image.height, image.width);
    let (ph, pw) = (round_up(h, f), round_up(w, f));
    let padded = pad(&image, ph, pw);

    let (mean, _logvar) = model.encode(&padded, 1, ph, pw)?;
    let decoded = model.decode(&mean, 1, ph / f, pw / f)?;
    let result = crop(&decoded, ph, pw, h, w);
    klvae::write_png(output, &result, h, w)?;

    println!(
        "{} ({}x{}) -> {} x {} x {} latent -> {}: PSNR {:.2} dB ({} backend, {} parameters)",
        input,
        w,
        h,
        model.latent_channels(),
        ph / f,
        pw / f,
        output,
        psnr(&image.pixels, &result),
        model.backend(),
        model.parameter_count()
    );
    Ok(())
}

fn round_up(v: usize, f: usize) -> usize {
    (v + f - 1) / f * f
}

/// The image enlarged to (3, ph, pw) by repeating its last row and column.
fn pad(image: &Image, ph: usize, pw: usize) -> Vec<f32> {
    let (h, w) = (image.height, image.width);
    let mut out = Vec::with_capacity(3 * ph * pw);
    for c in 0..3 {
        for i in 0..ph {
            let row = &image.pixels[(c * h + i.min(h - 1)) * w..][..w];
            out.extend((0..pw).map(|j| row[j.min(w - 1)]));
        }
    }
    out
}

/// The top-left (3, h, w) of a (3, ph, pw) image.
fn crop(pixels: &[f32], ph: usize, pw: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(3 * h * w);
    for c in 0..3 {
        for i in 0..h {
            out.extend_from_slice(&pixels[(c * ph + i) * pw..][..w]);
        }
    }
    out
}

/// What an 8-bit PNG stores for v in [-1, 1], back on [0, 1].
fn quantize(v: f32) -> f64 {
    let x = f64::from(v) * 0.5 + 0.5;
    let x = if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) };
    round_half_even(x * 255.0) / 255.0
}

/// Rounds to the nearest integer, ties to even (C's nearbyint in the default mode).
fn round_half_even(y: f64) -> f64 {
    let r = y.round();
    if (r - y).abs() == 0.5 {
        2.0 * (y / 2.0).round()
    } else {
        r
    }
}

/// Peak signal-to-noise ratio in dB on 8-bit values (99 for identical images).
fn psnr(a: &[f32], b: &[f32]) -> f64 {
    let se: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (quantize(x) - quantize(y)).powi(2))
        .sum();
    let mse = se / a.len() as f64;
    if mse > 0.0 {
        10.0 * (1.0 / mse).log10()
    } else {
        99.0
    }
}
