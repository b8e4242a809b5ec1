//! The signals the agent answers: SIGINT and SIGTERM stop it, SIGHUP reloads `--config`.

use tokio::signal::unix::{Signal, SignalKind, signal};

use super::AgentError;

/// SIGINT and SIGTERM: the first starts the drain, a second one ends it at once.
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

    /// Waits for the next SIGINT or SIGTERM and names it.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

/// SIGHUP's handler, installed when the serve loop starts.
pub fn hangup() -> Result<Signal, AgentError> {
    signal(SignalKind::hangup()).map_err(AgentError::Signals)
}
