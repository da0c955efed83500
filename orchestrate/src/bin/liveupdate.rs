#![forbid(unsafe_code)]
//! `liveupdate`: the operator's command for a live update of a running partition.

use clap::{Parser, Subcommand};
use orchestrate::config;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "liveupdate",
    about = "Live update of a running partition, on top of mcr"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The operation's configuration (lvupdate.data).
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// The journal: the start, success or failure of every operation.
    Log {
        /// Where liveupdate keeps its state.
        #[arg(long, default_value = orchestrate::STATE_DIR)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Checks a configuration: PASSED with what it says, or every problem by line.
    Check {
        #[arg(default_value = config::DEFAULT_PATH)]
        file: PathBuf,
    },
    /// Prints a commented template to start from.
    Template,
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Log { dir } => match orchestrate::journal::Journal::at(&dir).read() {
            Ok(read) => {
                print!("{}", orchestrate::journal::report(&read.entries));
                for (line, why) in read.bad {
                    eprintln!(
                        "liveupdate: {}: line {line}: {why}",
                        dir.join("journal").display()
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("liveupdate: {e}");
                ExitCode::from(1)
            }
        },
        Cmd::Config {
            cmd: ConfigCmd::Template,
        } => {
            print!("{}", config::TEMPLATE);
            ExitCode::SUCCESS
        }
        Cmd::Config {
            cmd: ConfigCmd::Check { file },
        } => match config::load(&file) {
            Ok(c) => {
                println!("PASSED: configuration {}", file.display());
                println!(
                    "  mode {}, kext_check {}",
                    c.general.mode,
                    yes(c.general.kext_check)
                );
                println!(
                    "  clone {}, mirror {}",
                    c.disks.clone.display(),
                    c.disks.mirror.display()
                );
                println!(
                    "  console unix:{} as {}, partition id {}",
                    c.console.address.display(),
                    c.console.user,
                    c.console
                        .partition_id
                        .map_or("chosen by the console".into(), |i| i.to_string())
                );
                ExitCode::SUCCESS
            }
            Err(config::ConfigError::Invalid { path, problems }) => {
                for p in &problems {
                    println!("FAILED: {}", p.at(&path));
                }
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!("liveupdate: {e}");
                ExitCode::from(1)
            }
        },
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
