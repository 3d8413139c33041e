//! Command-line arguments.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::DEFAULT_CONFIG_PATH;

/// Ships Opsera audit logs (user and token activity) to files, stdout and SIEMs,
/// losing none and sending none twice.
#[derive(Debug, Parser)]
#[command(name = "opsera-shipper", version, about, propagate_version = true)]
pub struct Cli {
    /// Config file (TOML).
    #[arg(long, short = 'c', global = true, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: poll and deliver until SIGTERM/SIGINT.
    Run,
    /// Poll every enabled stream up to now, deliver everything, then exit
    /// (0 done, 75 try again later, 77 token refused, 78 bad config).
    Once {
        /// How long sinks may take to deliver after polling.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Validate the config and the files it names (no network); print it with secrets masked.
    CheckConfig,
    /// Show watermarks, last polls and errors per stream, and lag per sink.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Poll a stream again from a point in time (its records from then on are delivered again).
    Reset {
        /// The stream to reset (user_activity, token_activity).
        #[arg(long)]
        stream: String,
        /// RFC 3339 time, YYYY-MM-DD, or a duration ago (e.g. 2d); default: the stream's initial_lookback.
        #[arg(long)]
        since: Option<String>,
    },
    /// Check the journal's segment files against the state database and drop
    /// the pages whose records cannot be read back (with the daemon stopped).
    Repair {
        /// Only report: exit 65 when a page is damaged, 0 when none is.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Probe readiness (`/readyz`): exit 0 when ready, 1 when not (for container health checks).
    Health {
        /// Base URL of the ops endpoints (default: from `[server] listen` in the config).
        #[arg(long)]
        url: Option<String>,
    },
    /// Records a sink refused permanently: list them, send them again, or delete them.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Run the whole pipeline against a built-in simulated Opsera API (no account or config needed).
    Demo {
        /// Stop by itself after this long (default: run until Ctrl-C).
        #[arg(long, value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Where the demo keeps its state database and audit.jsonl.
        #[arg(long, default_value = "opsera-shipper-demo")]
        dir: PathBuf,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s)
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterAction {
    /// One line per dead letter: sink, record _id, HTTP status, reason, time.
    List {
        #[arg(long)]
        sink: Option<String>,
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Mark dead letters to be sent again by their sink (by the running daemon, or the next `once`).
    Retry(DeadLetterSelection),
    /// Delete dead letters.
    Purge(DeadLetterSelection),
}

/// Which dead letters `retry` and `purge` act on.
#[derive(Debug, Args)]
pub struct DeadLetterSelection {
    #[arg(long)]
    pub sink: Option<String>,
    /// Record _id(s).
    #[arg(long = "id")]
    pub ids: Vec<String>,
    /// Every dead letter (of --sink, when given).
    #[arg(long)]
    pub all: bool,
}
