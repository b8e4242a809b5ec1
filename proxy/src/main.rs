use std::process::ExitCode;

use clap::Parser as _;
use proxy::{
    agent,
    config::{Cli, Command},
    error_chain,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(Into::into)
            .and_then(|rt| {
                rt.block_on(async {
                    let signals = agent::ShutdownSignals::install()?;
                    agent::run(*args, signals).await
                })
                .map_err(Into::into)
            }),
        Command::Upgrade(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Into::into)
            .and_then(|rt| {
                rt.block_on(proxy::upgrade::run(&args))
                    .map(|done| println!("{done}"))
                    .map_err(Into::into)
            }),
        Command::Cleanup(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Into::into)
            .and_then(|rt| rt.block_on(proxy::cleanup::run(&args)).map_err(Into::into)),
        Command::Doctor(args) => {
            return match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) if rt.block_on(proxy::doctor::run(&args)) => ExitCode::SUCCESS,
                Ok(_) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("proxy: error: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Stats(args) => proxy::stats::query(args.table)
            .map(|report| print!("{report}"))
            .map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("proxy: error: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
