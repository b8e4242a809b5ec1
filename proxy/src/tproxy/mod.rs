//! The agent's transparent sockets: listeners that receive what the classifier assigns,
//! and the socket options that make them transparent.

pub mod sockopt;
pub mod tcp;
pub mod udp;
