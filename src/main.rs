//! The `opsera-shipper` binary: parse arguments, set up logging, run a
//! command from the library, and turn the outcome into a sysexits code.

use std::process::ExitCode;

use clap::Parser;
use opsera_shipper::app::{self, AppError, exit};
use opsera_shipper::cli::{Cli, Command};
use opsera_shipper::config::{self, LoadOptions, LogFormat};

fn main() -> ExitCode {
    tune_malloc();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { exit::OK };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            tracing::error!(error = %e, "Exiting.");
            eprintln!("opsera-shipper: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run(cli: Cli) -> Result<u8, AppError> {
    let require_token = matches!(cli.command, Command::Run | Command::Once { .. } | Command::CheckConfig);
    if let Command::Demo { duration, dir } = cli.command {
        init_logging("info", LogFormat::Text);
        return runtime(1)?.block_on(app::demo(dir, duration));
    }
    if let Command::Health { url } = &cli.command {
        // A probe needs no token, and with --url no config at all.
        let cfg = match url {
            Some(_) => None,
            None => Some(config::load(&cli.config, &LoadOptions { require_token: false, env: None })?),
        };
        return runtime(1)?.block_on(app::health(url.clone(), cfg));
    }
    let cfg = config::load(&cli.config, &LoadOptions { require_token, env: None })?;
    init_logging(&cfg.log.level, cfg.log.format);
    for w in cfg.security_warnings() {
        tracing::warn!("{w}");
    }
    let workers = cfg.runtime.worker_threads;
    match cli.command {
        Command::CheckConfig => {
            print!("{}", cfg.render_masked());
            eprintln!("Config {} is valid.", cfg.source.display());
            Ok(exit::OK)
        }
        Command::Run => runtime(workers)?.block_on(app::run(cfg, tokio_util::sync::CancellationToken::new())),
        Command::Once { timeout } => runtime(workers)?.block_on(app::once(cfg, timeout)),
        Command::Status { json } => runtime(workers)?.block_on(app::status(cfg, json)),
        Command::Reset { stream, since } => runtime(workers)?.block_on(app::reset(cfg, &stream, since.as_deref())),
        Command::Repair { dry_run, json } => runtime(workers)?.block_on(app::repair(cfg, dry_run, json)),
        Command::DeadLetters { action } => runtime(workers)?.block_on(app::dead_letters(cfg, action)),
        Command::Demo { .. } | Command::Health { .. } => unreachable!("handled above"),
    }
}

/// The async runtime, with `workers` worker threads (`runtime.worker_threads`,
/// 1 unless configured). The async side fetches, parses and formats, and
/// hands everything that waits for the disk to threads of its own (the
/// storer, the blocking pool), so one worker keeps up; a backfill then
/// crosses between threads less often (against two workers, alternated:
/// faster in four pairs of runs of six, the same in the other two).
fn runtime(workers: usize) -> Result<tokio::runtime::Runtime, AppError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .map_err(|e| AppError::Other(anyhow::anyhow!("cannot start the async runtime: {e}")))
}

/// Logs go to stderr, never stdout (the stdout sink owns it). RUST_LOG overrides the level.
fn init_logging(level: &str, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    // The platform verifier logs each refused certificate at ERROR, with no
    // URL; the failed request is reported with its URL and that reason.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},rustls_platform_verifier=off")));
    // Colours only on a terminal: the journal and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// One malloc arena instead of glibc's default of eight per core. Records
/// are never allocated one by one (they are slices of their page's
/// buffer), so the threads allocate a few page-sized buffers per 1000
/// records and rarely meet on the arena's lock; buffers freed into several
/// arenas, on the other hand, stay resident. One arena keeps the peak RSS
/// of a long backfill about 1.5 MB below two (and several MB below eight)
/// at no measurable CPU cost. (Forcing such buffers to be mmapped,
/// `M_MMAP_THRESHOLD`, was tried: it saves RSS but costs about 3 µs of page
/// faults per record.)
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
