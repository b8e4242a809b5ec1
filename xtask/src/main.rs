//! Developer tasks: `cargo xtask build-ebpf | run | demo | test | bench | systemd-root`.
//!
//! Every task first installs what it needs and is missing (the `rust-src` component,
//! `bpf-linker` 0.10.3, Debian packages for the tests), saying what it does, so the README's
//! commands work on a fresh machine.

mod bench;
mod build_ebpf;
mod kernels;
mod prereqs;
mod run;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    about = "Developer tasks for the eBPF transparent proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF classifier object alone (bpfel-unknown-none, release).
    BuildEbpf(build_ebpf::Options),
    /// Build the agent in release mode and run it: `cargo xtask run -- run --iface eth0 ...`.
    Run(run::Options),
    /// Build the agent and `proxy-demo` and run the demo on a throwaway namespace topology.
    Demo(run::DemoOptions),
    /// Install test prerequisites and run every test (unit and kernel tests; needs root).
    Test(test::Options),
    /// Build in release mode and benchmark routing vs iptables TPROXY vs the eBPF
    /// classifier in namespaces; results in bench/results/ (needs root).
    Bench(bench::Options),
    /// Build (once, cached under target/) the Debian root that the systemd test boots with
    /// systemd-nspawn; `cargo xtask test` does it too.
    SystemdRoot,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::BuildEbpf(opts) => build_ebpf::build_ebpf(&opts),
        Task::Run(opts) => run::run(&opts),
        Task::Demo(opts) => run::demo(&opts),
        Task::Test(opts) => test::test(&opts),
        Task::Bench(opts) => bench::bench(&opts),
        Task::SystemdRoot => {
            prereqs::require_root("debootstrap")?;
            prereqs::ensure_system_tools()?;
            let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .ok_or_else(|| anyhow::anyhow!("the workspace directory"))?;
            let root = prereqs::ensure_systemd_root(workspace)?;
            println!("{}", root.display());
            Ok(())
        }
    }
}
