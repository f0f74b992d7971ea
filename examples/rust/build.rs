//! Finds libklvae with the `pkg-config` binary and tells cargo how to link it.
//!
//! `pkg-config --libs-only-L --libs-only-l klvae` (the `PKG_CONFIG` environment variable
//! may name another binary) gives the `-L` folders and `-l` names. Each `-L` folder becomes
//! a link search path and an rpath, so tests and examples run without `LD_LIBRARY_PATH`.
//!
//! pkg-config honours `PKG_CONFIG_PATH`: point it at `PREFIX/lib/pkgconfig` of an installed
//! copy (`make install PREFIX=...`), or at the `build/` folder of a built source tree, whose
//! `klvae-uninstalled.pc` pkg-config prefers automatically when asked for `klvae`.

use std::env;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for var in [
        "PKG_CONFIG",
        "PKG_CONFIG_PATH",
        "PKG_CONFIG_LIBDIR",
        "PKG_CONFIG_SYSROOT_DIR",
    ] {
        println!("cargo:rerun-if-env-changed={}", var);
    }

    let pkg_config = env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".to_string());
    let hint = "install libklvae (make install) or set PKG_CONFIG_PATH to the folder that holds \
                klvae.pc (PREFIX/lib/pkgconfig), or to the build/ folder of a built libklvae \
                source tree (it holds klvae-uninstalled.pc)";
    let output = match Command::new(&pkg_config)
        .args(["--libs-only-L", "--libs-only-l", "klvae"])
        .output()
    {
        Ok(output) => output,
        Err(e) => panic!(
            "\n\nklvae: cannot run `{}` ({}): install pkg-config (Debian: apt-get install \
             pkgconf), then {}\n\n",
            pkg_config, e, hint
        ),
    };
    if !output.status.success() {
        panic!(
            "\n\nklvae: `{} --libs-only-L --libs-only-l klvae` failed (PKG_CONFIG_PATH={}):\n{}\n\
             {}\n\n",
            pkg_config,
            env::var("PKG_CONFIG_PATH").unwrap_or_else(|_| "<unset>".to_string()),
            String::from_utf8_lossy(&output.stderr).trim_end(),
            hint
        );
    }
    let flags = String::from_utf8(output.stdout).expect("pkg-config printed non-UTF-8 flags");

    let mut found_lib = false;
    for flag in flags.split_whitespace() {
        if let Some(dir) = flag.strip_prefix("-L") {
            println!("cargo:rustc-link-search=native={}", dir);
            // Applies to this package's tests, examples and binaries (cargo does not pass
            // link args on to crates that depend on this one).
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir);
        } else if let Some(name) = flag.strip_prefix("-l") {
            found_lib |= name == "klvae";
            println!("cargo:rustc-link-lib={}", name);
        }
    }
    if !found_lib {
        panic!(
            "\n\nklvae: pkg-config's flags for klvae ({}) do not contain -lklvae; {}\n\n",
            flags.trim(),
            hint
        );
    }
}
