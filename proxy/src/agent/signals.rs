//! The signals the agent answers. Two ways to stop, chosen by the signal (DESIGN.md
//! section 9, `docs/handover.md`):
//! * SIGINT (Ctrl-C, `proxy stop`): stop for good. The drain, then everything the agent
//!   installed is removed; traffic flows as if the agent had never run.
//! * SIGTERM (what service managers and Kubernetes send, on a restart as on a stop): stop
//!   to be replaced. The agent serves on, waiting for its successor to take everything
//!   over (a handover), until its live connections are done or `--drain-timeout` passes;
//!   then it exits and leaves the classifier, the routes and the pins in place, as a crash
//!   does: no packet a rule matches goes past the proxy until the next agent takes over.
//!   `proxy cleanup` removes it all once no agent will come back.
//!
//! A second signal ends either at once. SIGHUP reloads `--config`.

use tokio::signal::unix::{Signal, SignalKind, signal};

use super::AgentError;

/// How the agent was asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Remove everything (SIGINT).
    ForGood,
    /// Leave the classifier and the routes for the next agent (SIGTERM).
    ToBeReplaced,
}

impl Stop {
    pub fn describe(self) -> &'static str {
        match self {
            Stop::ForGood => "stopping for good (everything installed is removed)",
            Stop::ToBeReplaced => {
                "stopping to be replaced (the classifier and the routes stay for the next agent; \
                 SIGINT or `proxy cleanup` removes them)"
            }
        }
    }
}

/// SIGINT and SIGTERM: the first starts the stop, a second one ends it at once.
pub struct ShutdownSignals {
    int: Signal,
    term: Signal,
}

impl ShutdownSignals {
    /// Installs the handlers. Must be called from a tokio runtime.
    pub fn install() -> Result<Self, AgentError> {
        Ok(ShutdownSignals {
            int: signal(SignalKind::interrupt()).map_err(AgentError::Signals)?,
            term: signal(SignalKind::terminate()).map_err(AgentError::Signals)?,
        })
    }

    /// Waits for the next SIGINT or SIGTERM; names it and says which stop it asks for.
    pub async fn recv(&mut self) -> (&'static str, Stop) {
        tokio::select! {
            _ = self.int.recv() => ("SIGINT", Stop::ForGood),
            _ = self.term.recv() => ("SIGTERM", Stop::ToBeReplaced),
        }
    }
}

/// SIGHUP's handler, installed when the serve loop starts.
pub fn hangup() -> Result<Signal, AgentError> {
    signal(SignalKind::hangup()).map_err(AgentError::Signals)
}
