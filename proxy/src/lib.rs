//! eBPF-assisted transparent proxy: the agent (`proxy run`) and the pieces it is made of.
//!
//! Packet path, file by file:
//! * `proxy-ebpf` (classifier at TC ingress) assigns intercepted packets to sockets and marks
//!   them; [`ebpf`] loads and attaches it (the variant [`link_header`] picks per interface)
//!   and fills its maps from [`rules`] and [`ifaddrs`].
//! * [`routing`] installs the fwmark rule and local route that deliver marked packets;
//!   [`src_valid_mark`] keeps them delivering when `src_valid_mark=1` (Tailscale) is set.
//! * [`tproxy`] holds the transparent listeners; [`upstream`] connects to the original
//!   destination and [`relay`] copies both ways, or [`kernel_relay`] has the kernel move
//!   the bytes (`--relay sockmap`).
//! * [`pins`] keeps the classifier attached when the agent dies (T12), and [`cleanup`]
//!   removes what a dead agent left.
//! * [`agent`] puts it together.

pub mod agent;
pub mod btf;
pub mod cleanup;
pub mod config;
pub mod ebpf;
pub mod generation;
pub mod ifaddrs;
pub mod kernel_relay;
pub mod link_header;
pub mod pins;
pub mod relay;
pub mod routing;
pub mod rules;
pub mod rules_file;
pub mod src_valid_mark;
pub mod stats;
pub mod tc_filter;
pub mod tcp_info;
pub mod tproxy;
pub mod upstream;

pub use proxy_common::error_chain;
