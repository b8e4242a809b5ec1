//! `proxy upgrade`: the in-place upgrade. Asks the running agent how it was started, starts
//! the binary on disk (this one) the same way, and waits: the new agent takes the listeners
//! and the live connections over (`crate::handover`) and tells systemd it is the service's
//! main process now; the old one exits.

use std::{
    os::unix::process::CommandExt as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    config::UpgradeArgs,
    handover::{HandoverError, Predecessor},
};

/// `proxy upgrade` failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// No agent answers on the table's handover socket.
    #[error("no agent runs with routing table {0} in this network namespace")]
    NoAgent(u32),
    /// The running agent could not be asked.
    #[error("asking the running agent")]
    Ask(#[source] HandoverError),
    /// The new agent could not be started.
    #[error("starting {0}")]
    Spawn(String, #[source] std::io::Error),
    /// The new agent exited before the old one: the old one serves on.
    #[error("the new agent exited with {0} before taking over; the running agent serves on")]
    Failed(std::process::ExitStatus),
}

/// Runs the upgrade; returns what to print.
pub async fn run(args: &UpgradeArgs) -> Result<String, UpgradeError> {
    let running = Predecessor::connect(args.table, false)
        .await
        .map_err(UpgradeError::Ask)?
        .ok_or(UpgradeError::NoAgent(args.table))?;
    let exe = std::env::current_exe().map_err(|e| UpgradeError::Spawn("this program".into(), e))?;
    let mut command = Command::new(&exe);
    command
        .args(&running.args)
        .stdin(Stdio::null())
        // Its own process group: a Ctrl-C meant for `proxy upgrade` does not reach it.
        .process_group(0);
    let mut child = command
        .spawn()
        .map_err(|e| UpgradeError::Spawn(exe.display().to_string(), e))?;
    let (old, new) = (running.pid.unwrap_or(0), child.id());
    // Dropped here: the running agent answers the new one next.
    let waited = Instant::now();
    let wait_old = tokio::task::spawn_blocking({
        let timeout = args.timeout;
        move || running.wait_exit(timeout)
    });
    tokio::pin!(wait_old);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(UpgradeError::Failed(status));
        }
        tokio::select! {
            exited = &mut wait_old => {
                return Ok(if exited.unwrap_or(false) {
                    format!(
                        "upgraded: agent pid {new} ({}) took over from pid {old} in {:.1} s",
                        exe.display(),
                        waited.elapsed().as_secs_f64()
                    )
                } else {
                    format!(
                        "agent pid {new} ({}) serves; pid {old} still runs after {:?} (its \
                         connections in the in-kernel relay drain there)",
                        exe.display(),
                        args.timeout
                    )
                });
            }
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}
