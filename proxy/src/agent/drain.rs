//! The drain on shutdown: no new connections, but the classifier and the routes stay
//! until the live ones are done, the drain timeout passes, or a second signal comes.

use std::time::Duration;

use log::{info, warn};

use super::{listeners::Listeners, signals::ShutdownSignals};
use crate::tproxy::tcp::LiveConnections;

/// Closes every listener (which also takes it out of the sockmap), then, after a clean
/// run, waits up to `timeout` for the live connections; the ones left are cut. After a
/// failed run nothing is waited for: the connections end when the workers stop.
pub async fn drain(
    listeners: &mut Listeners,
    live: &LiveConnections,
    timeout: Duration,
    signals: &mut ShutdownSignals,
    failed: bool,
) {
    listeners.close_all().await;
    if failed || live.count() == 0 {
        return;
    }
    info!(
        "draining {} live connection(s) for up to {:.0} s; signal again to exit now",
        live.count(),
        timeout.as_secs_f64()
    );
    tokio::select! {
        () = live.all_closed() => info!("drained: all connections closed"),
        () = tokio::time::sleep(timeout) => {
            warn!("drain timeout: {} connection(s) cut", live.count());
            cut(live).await;
        }
        (signal, _) = signals.recv() => {
            warn!("{signal} again: {} connection(s) cut", live.count());
            cut(live).await;
        }
    }
}

/// Resets the connections still live at the end of the drain, giving each a moment to log
/// its closing line (`drain`); the workers' shutdown then drops whatever is left.
async fn cut(live: &LiveConnections) {
    live.cut();
    let _ = tokio::time::timeout(Duration::from_secs(1), live.all_closed()).await;
}
