//! The read-only commands on what is stored: `status`, `streams ls`, `stream show`,
//! `log tail`.

use std::collections::BTreeMap;
use std::io::Write;

use eventfold::{EventStore, RecordedEvent, StreamId};
use serde::Serialize;

use crate::Outcome;
use crate::error::{CliError, Result};
use crate::output::{self, Table};
use crate::store::Store;

/// Events per read of the log.
const PAGE: usize = 1_000;

/// An event as the command shows it: its payload as JSON (as stored when it is not JSON).
#[derive(Serialize)]
pub struct EventView {
    /// Its position in the log.
    pub position: u64,
    /// Its stream, `Type/id`.
    pub stream: String,
    /// Its version in the stream.
    pub version: u64,
    /// Its event type name.
    pub event_type: String,
    /// Its payload's schema version.
    pub schema_version: u32,
    /// Its id.
    pub event_id: String,
    /// When it happened (RFC 3339).
    pub occurred_at: String,
    /// When it was stored (RFC 3339).
    pub recorded_at: String,
    /// Its metadata.
    pub metadata: eventfold::Metadata,
    /// Its payload as JSON.
    pub payload: serde_json::Value,
}

impl From<&RecordedEvent> for EventView {
    fn from(event: &RecordedEvent) -> EventView {
        EventView {
            position: event.position,
            stream: event.stream_id().to_string(),
            version: event.version,
            event_type: event.event_type.to_string(),
            schema_version: event.schema_version,
            event_id: event.event_id.to_string(),
            occurred_at: output::time(event.occurred_at),
            recorded_at: output::time(event.recorded_at),
            metadata: event.metadata.clone(),
            payload: payload(&event.payload),
        }
    }
}

/// A payload as JSON: the command links no event types, so it shows the stored JSON
/// (decoded into a value, not as escaped text), or the text itself when it is not JSON.
fn payload(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.to_owned()))
}

/// Up to `limit` stored events from `from` on, skipping the positions of pruned archives.
pub async fn read_page(store: &Store, from: u64, limit: usize) -> Result<Vec<RecordedEvent>> {
    Ok(store.archive().read_stored(from, limit).await?)
}

#[derive(Serialize)]
struct Status {
    backend: &'static str,
    location: String,
    schema_version: u32,
    head_position: u64,
    events: u64,
    streams: u64,
    snapshots: u64,
    size_bytes: Option<u64>,
    first_recorded_at: Option<String>,
    last_recorded_at: Option<String>,
    dead_letters: u64,
    failures: u64,
    events_by_type: BTreeMap<String, u64>,
    /// Archives pruned from the store and not restored.
    archives: Vec<ArchiveView>,
    subscriptions: Vec<SubscriptionView>,
}

#[derive(Serialize)]
struct ArchiveView {
    archive: String,
    path: String,
    events: u64,
    first_position: u64,
    last_position: u64,
    pruned_at: String,
}

/// A subscription as `status` and `subs ls` show it.
#[derive(Serialize)]
pub struct SubscriptionView {
    /// Its name.
    pub name: String,
    /// The last position it handled.
    pub checkpoint: u64,
    /// How far behind the head it is.
    pub lag: u64,
    /// Its dead letters.
    pub dead_letters: u64,
}

/// Every checkpointed subscription, with its lag and dead letters.
pub async fn subscriptions(store: &dyn EventStore) -> Result<Vec<SubscriptionView>> {
    let stats = store.statistics().await?;
    let dead = store.dead_letters(None).await?;
    Ok(stats
        .checkpoints
        .into_iter()
        .map(|c| SubscriptionView {
            dead_letters: dead
                .iter()
                .filter(|d| d.subscription == c.subscription)
                .count() as u64,
            name: c.subscription,
            checkpoint: c.position,
            lag: c.lag,
        })
        .collect())
}

/// Prints the subscriptions table.
pub fn print_subscriptions(out: &mut impl Write, subs: &[SubscriptionView]) -> Result<()> {
    let mut table = Table::new(&["SUBSCRIPTION", "CHECKPOINT", "LAG", "DEAD LETTERS"]);
    for sub in subs {
        table.row(vec![
            sub.name.clone(),
            sub.checkpoint.to_string(),
            sub.lag.to_string(),
            sub.dead_letters.to_string(),
        ]);
    }
    table.print(out)
}

/// `status`.
pub async fn status(store: &Store, json: bool, out: &mut impl Write) -> Result<Outcome> {
    let events = store.events();
    let stats = events.statistics().await?;
    let status = Status {
        backend: store.backend(),
        location: store.location(),
        schema_version: store.schema_version(),
        head_position: events.head_position().await?,
        events: stats.events,
        streams: stats.aggregates,
        snapshots: stats.snapshots,
        size_bytes: stats.size_bytes,
        first_recorded_at: stats.first_recorded_at.map(output::time),
        last_recorded_at: stats.last_recorded_at.map(output::time),
        dead_letters: stats.dead_letters,
        failures: stats.failures,
        events_by_type: stats.events_by_type,
        archives: store
            .archive()
            .archive_horizon()
            .await?
            .into_iter()
            .map(|h| ArchiveView {
                archive: h.archive.to_string(),
                path: h.path,
                events: h.events,
                first_position: h.first_position,
                last_position: h.last_position,
                pruned_at: output::time(h.pruned_at),
            })
            .collect(),
        subscriptions: subscriptions(&*events).await?,
    };
    if json {
        output::json(out, &status)?;
        return Ok(Outcome::Done);
    }
    let none = || "-".to_owned();
    output::fields(
        out,
        &[
            ("store", format!("{} {}", status.backend, status.location)),
            ("schema version", status.schema_version.to_string()),
            ("head position", status.head_position.to_string()),
            ("events", status.events.to_string()),
            ("streams", status.streams.to_string()),
            ("snapshots", status.snapshots.to_string()),
            (
                "size",
                status.size_bytes.map(output::bytes).unwrap_or_else(none),
            ),
            (
                "first recorded",
                status.first_recorded_at.clone().unwrap_or_else(none),
            ),
            (
                "last recorded",
                status.last_recorded_at.clone().unwrap_or_else(none),
            ),
            ("dead letters", status.dead_letters.to_string()),
            ("failures", status.failures.to_string()),
            (
                "archives",
                match &status.archives {
                    archives if archives.is_empty() => "0".to_owned(),
                    archives => format!(
                        "{} ({} events pruned)",
                        archives.len(),
                        archives.iter().map(|a| a.events).sum::<u64>()
                    ),
                },
            ),
        ],
    )?;
    if !status.archives.is_empty() {
        writeln!(out)?;
        let mut table = Table::new(&["ARCHIVE", "POSITIONS", "EVENTS", "PRUNED AT", "FILE"]);
        for a in &status.archives {
            table.row(vec![
                a.archive.clone(),
                format!("{}..={}", a.first_position, a.last_position),
                a.events.to_string(),
                a.pruned_at.clone(),
                a.path.clone(),
            ]);
        }
        table.print(out)?;
    }
    writeln!(out)?;
    print_subscriptions(out, &status.subscriptions)?;
    Ok(Outcome::Done)
}

/// `streams ls`: the store's own listing (one grouped query over its stream index).
pub async fn streams(
    store: &Store,
    only_type: Option<&str>,
    json: bool,
    out: &mut impl Write,
) -> Result<Outcome> {
    let streams = match store {
        Store::Sqlite(s) => s.streams(only_type).await?,
        Store::Postgres(s) => s.streams(only_type).await?,
    };
    if json {
        let views: Vec<serde_json::Value> = streams
            .iter()
            .map(|s| {
                serde_json::json!({
                    "stream": s.stream.to_string(),
                    "aggregate_type": s.stream.aggregate_type,
                    "aggregate_id": s.stream.aggregate_id,
                    "version": s.version,
                    "events": s.events,
                    "last_position": s.last_position,
                    "last_recorded_at": output::time(s.last_recorded_at),
                })
            })
            .collect();
        output::json(out, &views)?;
        return Ok(Outcome::Done);
    }
    let mut table = Table::new(&[
        "STREAM",
        "VERSION",
        "EVENTS",
        "LAST POSITION",
        "LAST RECORDED",
    ]);
    for s in &streams {
        table.row(vec![
            s.stream.to_string(),
            s.version.to_string(),
            s.events.to_string(),
            s.last_position.to_string(),
            output::time(s.last_recorded_at),
        ]);
    }
    table.print(out)?;
    Ok(Outcome::Done)
}

/// A stream id from `Type/id` (the id may hold further slashes).
pub fn parse_stream(id: &str) -> Result<StreamId> {
    match id.split_once('/') {
        Some((kind, rest)) if !kind.is_empty() && !rest.is_empty() => Ok(StreamId::new(kind, rest)),
        _ => Err(CliError::Usage(format!(
            "`{id}` is not a stream id: write `AggregateType/aggregate-id`"
        ))),
    }
}

/// `stream show`.
pub async fn stream_show(
    store: &Store,
    id: &str,
    from: u64,
    json: bool,
    out: &mut impl Write,
) -> Result<Outcome> {
    let stream = parse_stream(id)?;
    let events = store.events();
    if events.stream_version(&stream).await? == 0 {
        return Err(CliError::Usage(format!(
            "no stream `{stream}` in this store"
        )));
    }
    let views: Vec<EventView> = events
        .read_stream(&stream, from.max(1))
        .await?
        .iter()
        .map(EventView::from)
        .collect();
    if json {
        output::json(out, &views)?;
        return Ok(Outcome::Done);
    }
    let mut table = Table::new(&["VERSION", "POSITION", "RECORDED", "TYPE", "PAYLOAD"]);
    for v in &views {
        table.row(vec![
            v.version.to_string(),
            v.position.to_string(),
            v.recorded_at.clone(),
            format!("{} v{}", v.event_type, v.schema_version),
            v.payload.to_string(),
        ]);
    }
    table.print(out)?;
    Ok(Outcome::Done)
}

/// One line of `log tail`, in columns of fixed width so that followed lines align too.
fn tail_line(out: &mut impl Write, e: &EventView) -> Result<()> {
    writeln!(
        out,
        "{:>9}  {:<24}  {:<28}  {:>7}  {:<24}  {}",
        e.position, e.recorded_at, e.stream, e.version, e.event_type, e.payload
    )?;
    Ok(())
}

/// `log tail`: human lines, or one JSON object a line with --json.
pub async fn tail(
    store: &Store,
    from: Option<u64>,
    limit: u64,
    follow: bool,
    json: bool,
    out: &mut impl Write,
) -> Result<Outcome> {
    let events = store.events();
    let mut head_watch = events.watch_head();
    let head = events.head_position().await?;
    let mut next = from
        .unwrap_or_else(|| head.saturating_sub(limit) + 1)
        .max(1);
    if !json {
        writeln!(
            out,
            "{:>9}  {:<24}  {:<28}  {:>7}  {:<24}  PAYLOAD",
            "POSITION", "RECORDED", "STREAM", "VERSION", "TYPE"
        )?;
    }
    loop {
        loop {
            let page = read_page(store, next, PAGE).await?;
            let Some(last) = page.last() else { break };
            next = last.position + 1;
            for event in &page {
                let view = EventView::from(event);
                if json {
                    output::json_line(out, &view)?;
                } else {
                    tail_line(out, &view)?;
                }
            }
            out.flush()?;
        }
        if !follow {
            return Ok(Outcome::Done);
        }
        tokio::select! {
            changed = head_watch.changed() => {
                if changed.is_err() {
                    return Ok(Outcome::Done);
                }
            }
            _ = tokio::signal::ctrl_c() => return Ok(Outcome::Done),
        }
    }
}
