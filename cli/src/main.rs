//! `eventfold`: the operator's command for an eventfold store, a SQLite file or a
//! PostgreSQL database. It works through the library's public API only, and changes stored
//! data only in the commands that say so.
//!
//! Exit codes: 0 done, 1 a finding (damage found by `verify`, a replay that failed), 2 a
//! usage or store error.

#![forbid(unsafe_code)]

mod admin;
mod error;
mod log;
mod maintenance;
mod output;
mod replay;
mod store;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use eventfold::archive::ArchiveRange;

use crate::error::{CliError, Result};
use crate::maintenance::ArchiveAction;
use crate::store::Store;

/// Look into an eventfold store and act on it.
///
/// The store is a SQLite file (a path or `sqlite://PATH`) or a PostgreSQL database
/// (`postgres://user@host/db`, with --schema). Exit codes: 0 done, 1 a finding (damage, a
/// failed replay), 2 a usage or store error.
#[derive(Parser)]
#[command(name = "eventfold", version)]
struct Cli {
    /// The store: a SQLite file path, `sqlite://PATH`, or `postgres://user@host/db`.
    #[arg(long, short = 's', env = "EVENTFOLD_STORE", global = true)]
    store: Option<String>,
    /// The PostgreSQL schema the store lives in (default `eventfold`).
    #[arg(long, env = "EVENTFOLD_PG_SCHEMA", global = true)]
    schema: Option<String>,
    /// Print JSON on stdout instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Head position, events, streams, size, subscriptions with lag, dead letters, schema
    /// version.
    Status,
    /// The streams of the store.
    Streams {
        #[command(subcommand)]
        command: StreamsCommand,
    },
    /// One stream.
    Stream {
        #[command(subcommand)]
        command: StreamCommand,
    },
    /// The global log.
    Log {
        #[command(subcommand)]
        command: LogCommand,
    },
    /// The durable subscriptions (their checkpoints).
    Subs {
        #[command(subcommand)]
        command: SubsCommand,
    },
    /// One subscription.
    Sub {
        #[command(subcommand)]
        command: SubCommand,
    },
    /// Dead letters: the events subscriptions gave up on.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Failure records: failed handler attempts.
    Failures {
        #[command(subcommand)]
        command: FailuresCommand,
    },
    /// Checks every stored event and the numbering; exit code 1 if anything is damaged.
    Verify,
    /// Writes a consistent copy of a SQLite store to a new file, while it runs. On
    /// PostgreSQL it exits 2: a server database is backed up with `pg_dump`.
    Backup {
        /// The new file (never overwritten).
        path: std::path::PathBuf,
    },
    /// Archives of old history: compressed NDJSON files with a manifest (SQLite and
    /// PostgreSQL).
    Archive {
        #[command(subcommand)]
        command: ArchiveCommand,
    },
}

#[derive(Subcommand)]
enum ArchiveCommand {
    /// Writes the events of a range to a new archive file (the store is not changed).
    Export {
        /// The new archive file (never overwritten).
        path: std::path::PathBuf,
        /// Every stored event below this position.
        #[arg(
            long,
            value_name = "P",
            required_unless_present = "idle_before",
            conflicts_with = "idle_before"
        )]
        below: Option<u64>,
        /// Every event of the streams whose last event was recorded before this RFC 3339
        /// time.
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        idle_before: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Checks an archive file and that the store holds (or pruned) exactly its events;
    /// exit code 1 if not.
    Verify {
        /// The archive file.
        path: std::path::PathBuf,
    },
    /// Removes an archive's events from the store after verifying them (changes the
    /// store); refused while a subscription is behind them.
    Prune {
        /// The archive file.
        path: std::path::PathBuf,
    },
    /// Stores a pruned archive's events again, exactly (changes the store).
    Restore {
        /// The archive file.
        path: std::path::PathBuf,
    },
}

/// An RFC 3339 time.
fn parse_time(text: &str) -> std::result::Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("`{text}` is not an RFC 3339 time (2026-12-01T00:00:00Z): {e}"))
}

#[derive(Subcommand)]
enum SubsCommand {
    /// Every subscription with a checkpoint: its position, lag and dead letters.
    Ls,
}

#[derive(Subcommand)]
enum SubCommand {
    /// A subscription's checkpoint, lag, dead letters and latest failures.
    Show {
        /// The subscription's name.
        name: String,
        /// How many of the latest failure records to show.
        #[arg(long, default_value_t = 10)]
        failures: usize,
    },
    /// Sets a subscription's checkpoint (changes the store). Refused while a bus holds a
    /// live lease on it: stop the service first.
    Reset {
        /// The subscription's name.
        name: String,
        /// `start`, `end`, a position, or an RFC 3339 time (the first event recorded at or
        /// after it is delivered next).
        #[arg(long, value_name = "start|end|POSITION|TIME", value_parser = admin::parse_reset)]
        to: eventfold::ResetTo,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Dead letters, oldest first.
    Ls {
        /// Only this subscription's.
        #[arg(long = "sub", value_name = "NAME")]
        subscription: Option<String>,
    },
    /// A dead letter, its event and its replay requests; or, with --request, a replay
    /// request and its outcome (exit code 1 if the replay failed).
    Show {
        /// The dead letter's id.
        #[arg(required_unless_present = "request", conflicts_with = "request")]
        id: Option<u64>,
        /// A replay request's id (as `dlq replay` printed it).
        #[arg(long, value_name = "ID")]
        request: Option<u64>,
    },
    /// Asks the running service to replay dead letters (changes the store): stores a
    /// replay request, which the service's bus that runs the subscription carries out
    /// after its next lease round (within a third of its lease time, 10 s by default),
    /// and prints the request. --all without --sub: one request per subscription with
    /// dead letters. With --wait, waits for the outcome: exit code 1 if a replay failed
    /// or kept dead letters, or no service carried it out before the timeout (the request
    /// then stays pending).
    Replay {
        /// The dead letter's id.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<u64>,
        /// Every dead letter (of --sub).
        #[arg(long)]
        all: bool,
        /// With --all: only this subscription's.
        #[arg(long = "sub", value_name = "NAME", requires = "all")]
        subscription: Option<String>,
        /// Wait for the outcome (the store is read every 200 ms).
        #[arg(long)]
        wait: bool,
        /// With --wait: how long to wait, in seconds.
        #[arg(long, value_name = "SECS", default_value_t = 60, requires = "wait")]
        timeout: u64,
    },
    /// Removes dead letters without delivering them (changes the store).
    Discard {
        /// The dead letter's id.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<u64>,
        /// Every dead letter (of --sub).
        #[arg(long)]
        all: bool,
        /// With --all: only this subscription's.
        #[arg(long = "sub", value_name = "NAME", requires = "all")]
        subscription: Option<String>,
    },
}

#[derive(Subcommand)]
enum FailuresCommand {
    /// The latest failure records of each subscription (or of --sub), newest first.
    Ls {
        /// Only this subscription's.
        #[arg(long = "sub", value_name = "NAME")]
        subscription: Option<String>,
        /// At most this many per subscription.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Removes failure records (changes the store); dead letters stay.
    Clear {
        /// Only this subscription's.
        #[arg(long = "sub", value_name = "NAME")]
        subscription: Option<String>,
    },
}

#[derive(Subcommand)]
enum StreamsCommand {
    /// Every stream with its version, event count and last event.
    Ls {
        /// Only the streams of this aggregate type.
        #[arg(long = "type", value_name = "T")]
        aggregate_type: Option<String>,
    },
}

#[derive(Subcommand)]
enum StreamCommand {
    /// A stream's events with their payloads as JSON.
    Show {
        /// The stream, as `AggregateType/aggregate-id`.
        id: String,
        /// The first version to show.
        #[arg(long, default_value_t = 1)]
        from: u64,
    },
}

#[derive(Subcommand)]
enum LogCommand {
    /// The last events of the log, or those from a position on; --follow waits for more.
    Tail {
        /// The first position to show (default: the last --limit events).
        #[arg(long, value_name = "P")]
        from: Option<u64>,
        /// How many events to show without --from.
        #[arg(long, default_value_t = 20)]
        limit: u64,
        /// After the last event, wait for new ones and show them until interrupted.
        #[arg(long)]
        follow: bool,
    },
}

/// How a command that ran ended.
pub enum Outcome {
    /// Nothing to report beyond the output.
    Done,
    /// It found damage or a mismatch, or a replay failed (exit code 1).
    Finding,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("eventfold: cannot start: {error}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Finding) => ExitCode::from(1),
        Err(CliError::Output(error)) if error.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("eventfold: {error}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> Result<Outcome> {
    let target = cli.store.ok_or(CliError::NoStore)?;
    let store = Store::open(&target, cli.schema.as_deref()).await?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let outcome = dispatch(&store, cli.command, cli.json, &mut out).await;
    out.flush()?;
    // Close even after a failed command, and report the command's error first.
    let closed = store.close().await;
    let outcome = outcome?;
    closed?;
    Ok(outcome)
}

async fn dispatch(
    store: &Store,
    command: Command,
    json: bool,
    out: &mut impl Write,
) -> Result<Outcome> {
    match command {
        Command::Status => log::status(store, json, out).await,
        Command::Streams {
            command: StreamsCommand::Ls { aggregate_type },
        } => log::streams(store, aggregate_type.as_deref(), json, out).await,
        Command::Stream {
            command: StreamCommand::Show { id, from },
        } => log::stream_show(store, &id, from, json, out).await,
        Command::Log {
            command:
                LogCommand::Tail {
                    from,
                    limit,
                    follow,
                },
        } => log::tail(store, from, limit, follow, json, out).await,
        Command::Subs {
            command: SubsCommand::Ls,
        } => admin::subs_ls(store, json, out).await,
        Command::Sub {
            command: SubCommand::Show { name, failures },
        } => admin::sub_show(store, &name, failures, json, out).await,
        Command::Sub {
            command: SubCommand::Reset { name, to },
        } => admin::sub_reset(store, &name, to, json, out).await,
        Command::Dlq {
            command: DlqCommand::Ls { subscription },
        } => admin::dlq_ls(store, subscription.as_deref(), json, out).await,
        Command::Dlq {
            command: DlqCommand::Show { id, request },
        } => match (id, request) {
            (_, Some(request)) => replay::request_show(store, request, json, out).await,
            (Some(id), None) => admin::dlq_show(store, id, json, out).await,
            (None, None) => unreachable!("clap requires an id or --request"),
        },
        Command::Dlq {
            command:
                DlqCommand::Replay {
                    id,
                    subscription,
                    wait,
                    timeout,
                    ..
                },
        } => {
            let wait = wait.then(|| std::time::Duration::from_secs(timeout));
            replay::replay(store, replay::target(id, subscription), wait, json, out).await
        }
        Command::Dlq {
            command: DlqCommand::Discard {
                id, subscription, ..
            },
        } => admin::dlq_discard(store, id, subscription.as_deref(), json, out).await,
        Command::Failures {
            command:
                FailuresCommand::Ls {
                    subscription,
                    limit,
                },
        } => admin::failures_ls(store, subscription.as_deref(), limit, json, out).await,
        Command::Failures {
            command: FailuresCommand::Clear { subscription },
        } => admin::failures_clear(store, subscription.as_deref(), json, out).await,
        Command::Verify => maintenance::verify(store, json, out).await,
        Command::Backup { path } => maintenance::backup(store, &path, json, out).await,
        Command::Archive { command } => {
            let (action, path) = match command {
                ArchiveCommand::Export {
                    path,
                    below,
                    idle_before,
                } => {
                    let range = match (below, idle_before) {
                        (Some(position), _) => ArchiveRange::BelowPosition(position),
                        (None, Some(time)) => ArchiveRange::StreamsIdleBefore(time),
                        (None, None) => unreachable!("clap requires --below or --idle-before"),
                    };
                    (ArchiveAction::Export(range), path)
                }
                ArchiveCommand::Verify { path } => (ArchiveAction::Verify, path),
                ArchiveCommand::Prune { path } => (ArchiveAction::Prune, path),
                ArchiveCommand::Restore { path } => (ArchiveAction::Restore, path),
            };
            maintenance::archive(store, action, &path, json, out).await
        }
    }
}
