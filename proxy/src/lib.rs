//! eBPF-assisted transparent proxy: the agent (`proxy run`) and the pieces it is made of.
//!
//! Packet path, file by file:
//! * `proxy-ebpf` (classifier at TC ingress) assigns intercepted packets to sockets and marks
//!   them; [`ebpf`] loads and attaches it (the variant `link_header` picks per interface)
//!   and fills its maps from [`rules`] and `ifaddrs`.
//! * `routing` installs the fwmark rule and local route that deliver marked packets;
//!   [`src_valid_mark`] keeps them delivering when `src_valid_mark=1` (Tailscale) is set.
//! * `tproxy` holds the transparent listeners; `upstream` connects to the original
//!   destination and `relay` copies both ways, or has the kernel move the bytes
//!   (`relay::sockmap`, `--relay sockmap`).
//! * `pins` keeps the classifier attached when the agent dies (T12), and [`cleanup`]
//!   removes what a dead agent left.
//! * [`agent`] puts it together.
//!
//! The library exports what the `proxy` binary and the kernel tests use: the agent, its
//! command line ([`config`]), `proxy cleanup`, the [`stats`] client, and the classifier and
//! rule compiler the `BPF_PROG_TEST_RUN` tests drive. The namespaces the tests, the demo and
//! the benchmark build are in the `proxy-testbed` crate.

// These docs are for the people who work on the agent: they link to private modules
// (`cargo doc --document-private-items`).
#![allow(rustdoc::private_intra_doc_links)]

pub mod access_log;
pub mod agent;
mod btf;
pub mod cgroup;
pub mod cleanup;
pub mod config;
pub mod doctor;
pub mod ebpf;
mod generation;
pub mod handover;
mod ifaddrs;
pub mod kernel_features;
mod link_header;
pub mod metrics;
mod pins;
pub mod privileges;
mod relay;
mod routing;
pub mod rules;
mod rules_file;
pub mod src_valid_mark;
pub mod stats;
mod tc_filter;
mod tcp_info;
mod tproxy;
pub mod upgrade;
mod upstream;

pub use proxy_common::error_chain;
