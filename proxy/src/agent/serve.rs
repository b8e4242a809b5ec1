//! The serve loop: what the agent answers while it runs, until SIGINT or SIGTERM. SIGHUP
//! reloads `--config`, `proxy stats` gets the counters, interface events update the
//! classifier, and the src_valid_mark sysctls are checked again now and then (Tailscale
//! may set `src_valid_mark=1` at any time).

use log::{debug, error, info};
use std::time::Duration;

use tokio::{
    net::UnixListener,
    sync::mpsc::UnboundedReceiver,
    time::{Interval, MissedTickBehavior},
};

use super::{
    Agent, AgentError, config_watch::ConfigWatch, handover::HandedOver, report, signals,
    signals::Stop,
};
use crate::{error_chain, handover, ifaddrs::InterfaceEvent, metrics, stats};

/// Why the serve loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// A signal asked the agent to stop.
    Stopped(Stop),
    /// The next agent took everything over.
    HandedOver,
}

/// What the loop listens to besides the shutdown signals, made before the start so that
/// nothing is missed (an address change while the classifier is prepared, a second agent
/// on the same table).
pub struct Inputs {
    pub addr_changes: UnboundedReceiver<InterfaceEvent>,
    pub stats: UnixListener,
    pub stats_access: stats::Access,
    /// Where the next agent asks this one to hand over.
    pub handover: handover::Listener,
    pub sysctl_poll: Interval,
    /// When to ask again whether the return path is needed ([`Agent::refresh_return_path`]).
    pub return_path_poll: Interval,
    /// Scrapes of `--metrics` asking for the classifier's counters.
    pub metrics: metrics::Requests,
    /// `--config`'s file, watched (none without `--config`, or if inotify failed).
    pub config_watch: Option<ConfigWatch>,
}

/// The next change of the rules file; never without a watch.
async fn config_changed(watch: &mut Option<ConfigWatch>) {
    match watch {
        Some(watch) => watch.changed().await,
        None => std::future::pending().await,
    }
}

/// A timer for the loop's periodic checks; a tick missed while the loop was busy (a
/// reload) comes late rather than in a burst.
pub fn poll(period: Duration) -> Interval {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    interval
}

impl Agent {
    /// Tells the classifier whether to look up the return path, when that changed: off
    /// once the connections from before the last reload have ended.
    pub(super) fn refresh_return_path(&mut self) {
        let needed = self.return_path.needed();
        if needed.is_some() == self.return_path_lookup {
            return;
        }
        match self
            .installed
            .classifier
            .set_return_path_lookup(needed.is_some())
        {
            Ok(()) => {
                self.return_path_lookup = needed.is_some();
                report::log_return_path(needed);
            }
            Err(e) => error!("return path: updating the classifier: {}", error_chain(&e)),
        }
    }

    /// Serves until SIGINT, a handover, or, after SIGTERM, until the live connections are
    /// done or `--drain-timeout` passes (see `signals.rs`). Errors of a single event are
    /// logged and the loop goes on; an error returned here means the loop could not run at
    /// all.
    pub async fn serve(
        &mut self,
        signals: &mut signals::ShutdownSignals,
        inputs: &mut Inputs,
    ) -> Result<Exit, AgentError> {
        let mut hangup = signals::hangup()?;
        // After SIGTERM: when to stop waiting for the next agent.
        let mut replaced_by: Option<tokio::time::Instant> = None;
        let live = std::sync::Arc::clone(&self.live);
        loop {
            let deadline = async {
                match replaced_by {
                    Some(at) => {
                        tokio::select! {
                            () = tokio::time::sleep_until(at) => "the drain timeout passed",
                            () = live.all_closed() => "no connection is live",
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                (signal, stop) = signals.recv() => {
                    info!("{signal}: {}", stop.describe());
                    if stop == Stop::ForGood || replaced_by.is_some() {
                        return Ok(Exit::Stopped(stop));
                    }
                    info!(
                        "serving on until the next agent takes over (a handover), no \
                         connection is live, or {:.0} s pass; signal again to exit now",
                        self.args.drain_timeout.as_secs_f64()
                    );
                    replaced_by = Some(tokio::time::Instant::now() + self.args.drain_timeout);
                }
                why = deadline => {
                    info!("{why}: exiting, to be replaced");
                    return Ok(Exit::Stopped(Stop::ToBeReplaced));
                }
                Ok(channel) = inputs.handover.accept() => {
                    if let HandedOver::Yes { staying } = self.hand_over(channel, inputs).await {
                        info!(
                            "handover done: exiting without teardown{}",
                            if staying > 0 {
                                format!(" once {staying} connection(s) in the in-kernel relay end")
                            } else {
                                String::new()
                            }
                        );
                        return Ok(Exit::HandedOver);
                    }
                }
                _ = hangup.recv() => {
                    if let Some(watch) = &mut inputs.config_watch {
                        watch.read_now();
                    }
                    self.reload_logged("SIGHUP").await;
                }
                () = config_changed(&mut inputs.config_watch) => {
                    self.reload_logged("the rules file changed").await;
                }
                Some(event) = inputs.addr_changes.recv() => {
                    self.interfaces
                        .on_event(
                            event,
                            &mut self.installed.classifier,
                            &self.destinations,
                            self.args.tc_attach,
                        )
                        .await;
                }
                Ok((stream, _)) = inputs.stats.accept() => {
                    let text = match stream.peer_cred() {
                        Ok(cred) if inputs.stats_access.permits(&cred) => report::report(
                            &self.installed.classifier,
                            &self.rules,
                            &self.destinations,
                            &self.rules_status,
                        ),
                        Ok(cred) => {
                            debug!("stats: uid {} gid {} refused", cred.uid(), cred.gid());
                            inputs.stats_access.refusal()
                        }
                        Err(e) => stats::refusal(&format!("no peer credentials: {e}")),
                    };
                    stats::reply(stream, text);
                }
                reply = inputs.metrics.next() => {
                    // Never waits: a scrape that gave up has dropped its receiver.
                    let _ = reply.send(report::snapshot(
                        &self.installed.classifier,
                        &self.rules,
                        &self.destinations,
                        &self.rules_status,
                    ));
                }
                _ = inputs.sysctl_poll.tick() => self.installed.sysctls.recheck(),
                _ = inputs.return_path_poll.tick() => self.refresh_return_path(),
            }
        }
    }
}
