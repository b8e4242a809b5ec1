//! Only the binary target (`src/main.rs`) is built for eBPF; this empty library lets
//! `proxy` declare a build-dependency on the crate so cargo tracks its changes.
#![no_std]
