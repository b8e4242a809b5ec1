//! Tests on kernels that lack what they test: skipped with the reason, never failed and
//! never silent; and waits stretched under emulation.
//!
//! A test that needs a [`Feature`] starts with `if kernel_lacks(Feature::X) { return; }`.
//! The reason comes from the agent's own table (`proxy::kernel_features`), so a test is
//! skipped exactly where the agent refuses or falls back. It is written, as
//! `test name: reason`, to the file `PROXY_TEST_SKIPS` names; `cargo xtask test` adds the
//! skips up beside the passes and failures and prints each reason once.

use std::{io::Write as _, time::Duration};

pub use proxy::kernel_features::Feature;

/// Whether the running kernel lacks `feature`; if so, the skip is recorded.
pub fn kernel_lacks(feature: Feature) -> bool {
    if feature.here() {
        return false;
    }
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    let reason = format!(
        "{} needs Linux {} (this is {release}); without it the agent {}",
        feature.what(),
        feature.min_kernel(),
        feature.without()
    );
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    eprintln!("skipped: {reason}");
    if let Some(path) = std::env::var_os("PROXY_TEST_SKIPS") {
        let line = format!("{test}: {reason}\n");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            panic!("recording the skip in {}: {e}", path.to_string_lossy());
        }
    }
    true
}

/// `wait`, stretched by `PROXY_TEST_TIME_SCALE` (set under QEMU's emulation, where
/// everything runs several times slower): for how long a test waits for something to
/// happen, never for what it asserts about time.
pub fn patience(wait: Duration) -> Duration {
    let scale = std::env::var("PROXY_TEST_TIME_SCALE")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    wait * scale
}
