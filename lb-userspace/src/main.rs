//! `mlb`: thin entry point; everything lives in the library.

use clap::{CommandFactory as _, Parser as _};
use lb_common::hash::Flow;
use lb_userspace::{
    backend,
    cli::{BackendCommand, Cli, Command, OnOff},
    commands, daemon,
};

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mlb: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            config,
            detach_on_exit,
        } => {
            init_logging();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(daemon::run(
                daemon::Options {
                    config,
                    detach_on_exit,
                },
                std::future::pending(),
            ))
        }
        Command::Check { files } => commands::check(&files),
        Command::Backend(command) => {
            let text = match command {
                BackendCommand::Attach {
                    interface,
                    lb_sources,
                    gue_port,
                    xdp_mode,
                    pin_path,
                } => backend::attach(&interface, &lb_sources, gue_port, xdp_mode, &pin_path)?,
                BackendCommand::Status {
                    prometheus,
                    pin_path,
                } => backend::status(&pin_path, prometheus)?,
                BackendCommand::Detach {
                    interface,
                    pin_path,
                } => backend::detach(&interface, &pin_path)?,
            };
            print!("{text}");
            if !text.ends_with('\n') {
                println!();
            }
            Ok(())
        }
        Command::Plan {
            file,
            against,
            pin_path,
        } => {
            print!("{}", commands::plan(&file, against.as_deref(), &pin_path)?);
            Ok(())
        }
        Command::Status { pin_path, json } => {
            if json {
                let (snapshot, _) = commands::status_snapshot(&pin_path)?;
                println!("{}", serde_json::to_string_pretty(&snapshot)?);
            } else {
                print!("{}", commands::status(&pin_path)?);
            }
            Ok(())
        }
        Command::Trace {
            src,
            sport,
            dst,
            dport,
            proto,
            pin_path,
        } => {
            print!(
                "{}",
                commands::trace(
                    &Flow {
                        src,
                        dst,
                        sport,
                        dport,
                        proto: proto.number(),
                    },
                    &pin_path
                )?
            );
            Ok(())
        }
        Command::Drain { address, pin_path } => {
            println!("{}", commands::drain(address, true, &pin_path)?);
            Ok(())
        }
        Command::Undrain { address, pin_path } => {
            println!("{}", commands::drain(address, false, &pin_path)?);
            Ok(())
        }
        Command::Maintenance { state, pin_path } => {
            println!(
                "{}",
                commands::maintenance(matches!(state, OnOff::On), &pin_path)?
            );
            Ok(())
        }
        Command::Detach { pin_path } => {
            println!("{}", commands::detach(&pin_path)?);
            Ok(())
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "mlb", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir } => {
            std::fs::create_dir_all(&dir)?;
            clap_mangen::generate_to(Cli::command(), &dir)?;
            Ok(())
        }
    }
}

/// Structured logs to stderr (journald captures them); `RUST_LOG` overrides the level.
fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
