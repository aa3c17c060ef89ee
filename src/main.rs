//! The `pgds` command line: `run` (the sidecar) and `check` (validate config and database).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::watch;
use tracing::{error, info};

use pgds::config::{Config, LogFormat};
use pgds::pipeline::{self, PipelineError};
use pgds::{check, ops, source};

/// Exit code for a configuration that cannot be loaded.
const EXIT_CONFIG: u8 = 2;
/// Exit code for a database that is not ready (check failed).
const EXIT_CHECK: u8 = 3;
/// Exit code for a runtime failure.
const EXIT_RUNTIME: u8 = 1;

#[derive(Parser)]
#[command(
    version,
    about = "Stream PostgreSQL changes to per-user Durable Streams"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar: replicate, route and append until SIGINT/SIGTERM.
    Run {
        /// The TOML configuration file (keys can be overridden by PGDS__SECTION__KEY).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate the configuration and the database, print each problem with its fix.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Re-emit the current state of a user, of a table's users, or of everyone: `reset`, then
    /// the snapshot bracket, then live changes (the running pgds does the copy).
    Resync {
        #[arg(long, short)]
        config: PathBuf,
        #[command(flatten)]
        scope: ResyncScope,
    },
    /// Print a user's stream, one event per line: catch up from an offset, then follow it.
    Tail {
        /// The pgds configuration file: its [streams] section says where the stream is.
        #[arg(long, short)]
        config: PathBuf,
        #[command(flatten)]
        args: pgds::tail::TailArgs,
    },
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    let path = match &cli.command {
        Command::Run { config }
        | Command::Check { config }
        | Command::Resync { config, .. }
        | Command::Tail { config, .. } => config,
    };
    let cfg = match Config::load(path) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("pgds: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_tracing(cfg.log.format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgds: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    runtime.block_on(async {
        match cli.command {
            // On a worker thread, next to the writer's tasks: polled by `block_on` on this
            // thread instead, every hand-over to the writer is a cross-thread wake-up (on a busy
            // 2-core machine that halved the throughput).
            Command::Run { .. } => match tokio::spawn(run(cfg)).await {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("pgds: the pipeline task failed: {e}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            },
            Command::Check { .. } => check_command(cfg).await,
            Command::Resync { scope, .. } => resync_command(cfg, scope).await,
            Command::Tail { args, .. } => match pgds::tail::run(&cfg, args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!(error = %format_chain(&e), "tail stopped on an error");
                    ExitCode::from(EXIT_RUNTIME)
                }
            },
        }
    })
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(cfg: Config) -> ExitCode {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        if let Err(e) = wait_for_signal().await {
            error!(error = %e, "cannot listen for signals");
            return;
        }
        let _ = stop_tx.send(true);
    });
    info!(version = env!("CARGO_PKG_VERSION"), "pgds starting");
    if let Some(addr) = cfg.metrics.listen {
        match ops::bind(addr).await {
            Ok(listener) => {
                tokio::spawn(ops::serve(listener, cfg.metrics.ready_max_lag));
            }
            Err(e) => {
                error!(%addr, error = %e, "cannot listen for metrics.listen");
                return ExitCode::from(EXIT_RUNTIME);
            }
        }
    }
    match pipeline::run(cfg, stop_rx).await {
        Ok(()) => {
            info!("pgds stopped");
            ExitCode::SUCCESS
        }
        Err(e @ PipelineError::Check(_)) => {
            error!("{e}");
            ExitCode::from(EXIT_CHECK)
        }
        // The slot cannot serve this configuration (invalidated while running, say): the
        // operator must act, as when the check finds it at start.
        Err(PipelineError::Slot(e)) if !matches!(e, source::slot::SlotError::Db(_)) => {
            error!("{e}");
            ExitCode::from(EXIT_CHECK)
        }
        Err(e) => {
            error!(error = %format_chain(&e), "pgds stopped on an error");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct ResyncScope {
    /// One user's stream.
    #[arg(long)]
    user: Option<String>,
    /// The streams of every user with rows in this table (schema.table, as configured).
    #[arg(long)]
    table: Option<String>,
    /// Every stream.
    #[arg(long)]
    all: bool,
}

/// Ask the running pgds for a resync: a logical decoding message in the replication stream.
async fn resync_command(cfg: Config, scope: ResyncScope) -> ExitCode {
    if let Some(table) = &scope.table
        && !cfg.tables.iter().any(|t| t.table.to_string() == *table)
    {
        eprintln!("pgds: table {table:?} is not configured (use schema.table as in [[tables]])");
        return ExitCode::from(EXIT_CONFIG);
    }
    let request = pgds::pipeline::ResyncRequest {
        slot: cfg.postgres.slot.clone(),
        user: scope.user,
        table: scope.table,
        all: scope.all,
    };
    let sent = async {
        let client = source::connect::connect(&cfg.postgres.conn, "pgds-resync").await?;
        let content = serde_json::to_string(&request).unwrap_or_default();
        let row = client
            .query_one(
                "SELECT pg_logical_emit_message(true, $1, $2)::text",
                &[&pgds::pipeline::REQUEST_PREFIX, &content],
            )
            .await?;
        anyhow::Ok(row.get::<_, String>(0))
    };
    match sent.await {
        Ok(lsn) => {
            println!(
                "resync requested at {lsn} for slot {:?}: the running pgds re-emits the state when it reaches it",
                cfg.postgres.slot
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "pgds: cannot request the resync: {}",
                format_chain(e.as_ref())
            );
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

async fn check_command(cfg: Config) -> ExitCode {
    println!("configuration: ok ({} tables)", cfg.tables.len());
    let client = match source::connect::connect(&cfg.postgres.conn, "pgds-check").await {
        Ok(c) => c,
        Err(e) => {
            println!("problem: {}", format_chain(&e));
            return ExitCode::from(EXIT_CHECK);
        }
    };
    let report = match check::check_database(&cfg, &client).await {
        Ok(r) => r,
        Err(e) => {
            println!("problem: database query failed: {}", format_chain(&e));
            return ExitCode::from(EXIT_CHECK);
        }
    };
    for note in &report.notes {
        println!("note: {note}");
    }
    let mut problems: Vec<String> = report.problems.clone();
    problems.extend(report.slot_busy.as_ref().map(ToString::to_string));
    for problem in &problems {
        println!("problem: {problem}");
    }
    if problems.is_empty() {
        println!("database: ok");
        ExitCode::SUCCESS
    } else {
        println!("{} problem(s) found", problems.len());
        ExitCode::from(EXIT_CHECK)
    }
}

/// An error with its sources, on one line.
fn format_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keep mimalloc's resident set close to what pgds uses. With 100k streams alive
/// (`bench/throughput`, `MODES=streams`, 32 MiB buffer) the two together took the peak from 110
/// to 93-96 MB, for about 5% less throughput in the large-transaction and 1k-user cells:
/// - mimalloc asks for transparent huge pages for its arenas, which grows the resident set in
///   2 MiB steps: turned off for the process (unless `MIMALLOC_ALLOW_THP` is set);
/// - it returns freed memory to the OS 10 ms late: at once instead (unless
///   `MIMALLOC_PURGE_DELAY` is set).
fn tune_allocator() {
    /// `mi_option_purge_delay` in mimalloc 2.x and 3.x (`mimalloc.h`), which the pinned
    /// `libmimalloc-sys` does not name.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: PR_SET_THP_DISABLE only sets a flag of this process.
        unsafe {
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        }
    }
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's options; no memory is touched.
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        }
    }
}
