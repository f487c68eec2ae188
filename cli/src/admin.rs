//! The subscription commands: `subs ls`, `sub show`, `sub reset`, `dlq ...`, `failures ...`.
//! Only `sub reset`, `dlq replay` (it stores a request), `dlq discard` and `failures clear`
//! change what is stored.

use std::collections::BTreeSet;
use std::io::Write;

use eventfold::{DeadLetter, EventBus, EventStore, FailureRecord, ReplayRequest, ResetTo};
use serde::Serialize;

use crate::Outcome;
use crate::error::{CliError, Result};
use crate::log::{EventView, print_subscriptions, subscriptions};
use crate::output::{self, Table};
use crate::store::Store;

/// `subs ls`.
pub async fn subs_ls(store: &Store, json: bool, out: &mut impl Write) -> Result<Outcome> {
    let subs = subscriptions(&*store.events()).await?;
    if json {
        output::json(out, &subs)?;
    } else {
        print_subscriptions(out, &subs)?;
    }
    Ok(Outcome::Done)
}

#[derive(Serialize)]
struct SubscriptionDetail {
    name: String,
    checkpoint: Option<u64>,
    head_position: u64,
    lag: u64,
    /// Its segments, when several processes share it (empty if it was never leased).
    segments: Vec<SegmentView>,
    dead_letters: Vec<DeadLetter>,
    recent_failures: Vec<FailureRecord>,
}

#[derive(Serialize)]
struct SegmentView {
    segment: u32,
    segments: u32,
    owner: Option<String>,
    epoch: u64,
    expires_at: Option<String>,
    checkpoint: u64,
}

/// `sub show`: a subscription's checkpoint, lag, segment leases, dead letters and latest
/// failures.
pub async fn sub_show(
    store: &Store,
    name: &str,
    failures: usize,
    json: bool,
    out: &mut impl Write,
) -> Result<Outcome> {
    let events = store.events();
    let checkpoint = events.load_checkpoint(name).await?;
    let dead_letters = events.dead_letters(Some(name)).await?;
    let recent_failures = events.failures(name, failures).await?;
    let segments: Vec<SegmentView> = events
        .segment_states(name)
        .await?
        .into_iter()
        .map(|s| SegmentView {
            segment: s.segment,
            segments: s.segments,
            owner: s.owner,
            epoch: s.epoch,
            expires_at: s.expires_at.map(output::time),
            checkpoint: s.checkpoint,
        })
        .collect();
    if checkpoint.is_none()
        && segments.is_empty()
        && dead_letters.is_empty()
        && recent_failures.is_empty()
    {
        return Err(CliError::Usage(format!(
            "no subscription `{name}` in this store (no checkpoint, segment, dead letter or \
             failure)"
        )));
    }
    let head_position = events.head_position().await?;
    let detail = SubscriptionDetail {
        name: name.to_owned(),
        checkpoint,
        head_position,
        lag: head_position.saturating_sub(checkpoint.unwrap_or(0)),
        segments,
        dead_letters,
        recent_failures,
    };
    if json {
        output::json(out, &detail)?;
        return Ok(Outcome::Done);
    }
    output::fields(
        out,
        &[
            ("subscription", detail.name.clone()),
            (
                "checkpoint",
                detail
                    .checkpoint
                    .map_or_else(|| "none".to_owned(), |c| c.to_string()),
            ),
            ("head position", detail.head_position.to_string()),
            ("lag", detail.lag.to_string()),
            ("dead letters", detail.dead_letters.len().to_string()),
        ],
    )?;
    if !detail.segments.is_empty() {
        writeln!(out)?;
        let mut table = Table::new(&["SEGMENT", "OWNER", "EPOCH", "EXPIRES", "CHECKPOINT"]);
        for s in &detail.segments {
            table.row(vec![
                format!("{}/{}", s.segment, s.segments),
                s.owner.clone().unwrap_or_else(|| "-".to_owned()),
                s.epoch.to_string(),
                s.expires_at.clone().unwrap_or_else(|| "-".to_owned()),
                s.checkpoint.to_string(),
            ]);
        }
        table.print(out)?;
    }
    writeln!(out)?;
    print_dead_letters(out, &detail.dead_letters)?;
    writeln!(out)?;
    print_failures(out, &detail.recent_failures)?;
    Ok(Outcome::Done)
}

/// Where `sub reset --to` sets the checkpoint, from `start`, `end`, a position or an
/// RFC 3339 time.
pub fn parse_reset(to: &str) -> std::result::Result<ResetTo, String> {
    match to {
        "start" => Ok(ResetTo::Start),
        "end" => Ok(ResetTo::End),
        _ => {
            if let Ok(position) = to.parse::<u64>() {
                return Ok(ResetTo::Position(position));
            }
            chrono::DateTime::parse_from_rfc3339(to)
                .map(|t| ResetTo::Time(t.with_timezone(&chrono::Utc)))
                .map_err(|_| {
                    format!(
                        "`{to}` is none of start, end, a position or an RFC 3339 time \
                         (2026-12-01T00:00:00Z)"
                    )
                })
        }
    }
}

#[derive(Serialize)]
struct Reset {
    subscription: String,
    previous: Option<u64>,
    checkpoint: u64,
}

/// `sub reset`: through a bus that is built on the store and never started, so the
/// library's own checks apply (a subscription another process runs is refused).
pub async fn sub_reset(
    store: &Store,
    name: &str,
    to: ResetTo,
    json: bool,
    out: &mut impl Write,
) -> Result<Outcome> {
    let events = store.events();
    let previous = events.load_checkpoint(name).await?;
    let bus = EventBus::builder().store(events).build()?;
    let checkpoint = bus.reset_subscription(name, to).await?;
    let reset = Reset {
        subscription: name.to_owned(),
        previous,
        checkpoint,
    };
    if json {
        output::json(out, &reset)?;
    } else {
        let before = previous.map_or_else(|| "none".to_owned(), |p| p.to_string());
        writeln!(out, "{name}: checkpoint {before} -> {checkpoint}")?;
    }
    Ok(Outcome::Done)
}

fn print_dead_letters(out: &mut impl Write, letters: &[DeadLetter]) -> Result<()> {
    let mut table = Table::new(&[
        "ID",
        "SUBSCRIPTION",
        "POSITION",
        "EVENT TYPE",
        "ATTEMPTS",
        "LAST FAILED",
        "ERROR",
    ]);
    for d in letters {
        table.row(vec![
            d.id.to_string(),
            d.subscription.clone(),
            d.position.to_string(),
            d.event_type.clone(),
            d.attempts.to_string(),
            output::time(d.last_failed_at),
            d.error.clone(),
        ]);
    }
    table.print(out)
}

fn print_failures(out: &mut impl Write, failures: &[FailureRecord]) -> Result<()> {
    let mut table = Table::new(&[
        "SUBSCRIPTION",
        "POSITION",
        "ATTEMPT",
        "FAILED AT",
        "DURATION",
        "ERROR",
    ]);
    for f in failures {
        table.row(vec![
            f.subscription.clone(),
            f.position.to_string(),
            f.attempt.to_string(),
            output::time(f.failed_at),
            format!("{} us", f.duration_micros),
            f.error.clone(),
        ]);
    }
    table.print(out)
}

#[derive(Serialize)]
struct DeadLetterList {
    dead_letters: Vec<DeadLetter>,
    /// Replay requests no running service has carried out yet.
    pending_replay_requests: Vec<ReplayRequest>,
}

/// `dlq ls`: the dead letters, and the replay requests still pending.
pub async fn dlq_ls(
    store: &Store,
    subscription: Option<&str>,
    json: bool,
    out: &mut impl Write,
) -> Result<Outcome> {
    let events = store.events();
    let dead_letters = events.dead_letters(subscription).await?;
    let pending_replay_requests: Vec<ReplayRequest> = events
        .replay_requests(subscription)
        .await?
        .into_iter()
        .filter(ReplayRequest::is_pending)
        .collect();
    if json {
        output::json(
            out,
            &DeadLetterList {
                dead_letters,
                pending_replay_requests,
            },
        )?;
    } else {
        print_dead_letters(out, &dead_letters)?;
        if !pending_replay_requests.is_empty() {
            writeln!(
                out,
                "
pending replay requests:"
            )?;
            crate::replay::print_requests(out, &pending_replay_requests)?;
        }
    }
    Ok(Outcome::Done)
}

async fn find_dead_letter(events: &dyn EventStore, id: u64) -> Result<DeadLetter> {
    events
        .dead_letters(None)
        .await?
        .into_iter()
        .find(|d| d.id == id)
        .ok_or_else(|| CliError::Store(eventfold::Error::DeadLetterNotFound { id }))
}

#[derive(Serialize)]
struct DeadLetterDetail {
    dead_letter: DeadLetter,
    /// The event, if it can be read.
    event: Option<EventView>,
    /// Why it cannot.
    event_error: Option<String>,
    /// The replay requests that name it, oldest first.
    replay_requests: Vec<ReplayRequest>,
}

/// `dlq show`: a dead letter and its event.
pub async fn dlq_show(store: &Store, id: u64, json: bool, out: &mut impl Write) -> Result<Outcome> {
    let events = store.events();
    let dead_letter = find_dead_letter(&*events, id).await?;
    let (event, event_error) = match events.get(dead_letter.event_id).await {
        Ok(Some(event)) => (Some(EventView::from(&event)), None),
        Ok(None) => (None, Some("the event is not stored".to_owned())),
        Err(error) => (None, Some(eventfold::backend::error_chain(&error))),
    };
    let replay_requests = events
        .replay_requests(Some(&dead_letter.subscription))
        .await?
        .into_iter()
        .filter(|r| r.dead_letter == Some(id))
        .collect();
    let detail = DeadLetterDetail {
        dead_letter,
        event,
        event_error,
        replay_requests,
    };
    if json {
        output::json(out, &detail)?;
        return Ok(Outcome::Done);
    }
    let d = &detail.dead_letter;
    let mut lines = vec![
        ("dead letter", d.id.to_string()),
        ("subscription", d.subscription.clone()),
        ("event", d.event_id.to_string()),
        ("position", d.position.to_string()),
        ("event type", d.event_type.clone()),
        ("attempts", d.attempts.to_string()),
        ("first failed", output::time(d.first_failed_at)),
        ("last failed", output::time(d.last_failed_at)),
        ("error", d.error.clone()),
    ];
    match (&detail.event, &detail.event_error) {
        (Some(e), _) => {
            lines.push(("stream", format!("{} v{}", e.stream, e.version)));
            lines.push(("payload", e.payload.to_string()));
        }
        (None, Some(why)) => lines.push(("event error", why.clone())),
        (None, None) => {}
    }
    output::fields(out, &lines)?;
    if !detail.replay_requests.is_empty() {
        writeln!(out, "\nreplay requests:")?;
        crate::replay::print_requests(out, &detail.replay_requests)?;
    }
    Ok(Outcome::Done)
}

#[derive(Serialize)]
struct Removed {
    removed: u64,
}

/// `dlq discard`: one dead letter, or all (of one subscription).
pub async fn dlq_discard(
    store: &Store,
    id: Option<u64>,
    subscription: Option<&str>,
    json: bool,
    out: &mut impl Write,
) -> Result<Outcome> {
    let events = store.events();
    let removed = match id {
        Some(id) => {
            if !events.remove_dead_letter(id).await? {
                return Err(eventfold::Error::DeadLetterNotFound { id }.into());
            }
            1
        }
        None => events.clear_dead_letters(subscription).await?,
    };
    if json {
        output::json(out, &Removed { removed })?;
    } else {
        writeln!(out, "discarded {removed} dead letter(s)")?;
    }
    Ok(Outcome::Done)
}

/// The subscriptions the store knows of: checkpointed or with dead letters.
async fn known_subscriptions(events: &dyn EventStore) -> Result<BTreeSet<String>> {
    let mut names: BTreeSet<String> = events
        .statistics()
        .await?
        .checkpoints
        .into_iter()
        .map(|c| c.subscription)
        .collect();
    names.extend(
        events
            .dead_letters(None)
            .await?
            .into_iter()
            .map(|d| d.subscription),
    );
    Ok(names)
}

/// `failures ls`: the newest `limit` failure records of one subscription or of each.
pub async fn failures_ls(
    store: &Store,
    subscription: Option<&str>,
    limit: usize,
    json: bool,
    out: &mut impl Write,
) -> Result<Outcome> {
    let events = store.events();
    let names = match subscription {
        Some(name) => BTreeSet::from([name.to_owned()]),
        None => known_subscriptions(&*events).await?,
    };
    let mut failures = Vec::new();
    for name in &names {
        failures.extend(events.failures(name, limit).await?);
    }
    if json {
        output::json(out, &failures)?;
    } else {
        print_failures(out, &failures)?;
    }
    Ok(Outcome::Done)
}

/// `failures clear`.
pub async fn failures_clear(
    store: &Store,
    subscription: Option<&str>,
    json: bool,
    out: &mut impl Write,
) -> Result<Outcome> {
    let removed = store.events().clear_failures(subscription).await?;
    if json {
        output::json(out, &Removed { removed })?;
    } else {
        writeln!(out, "cleared {removed} failure record(s)")?;
    }
    Ok(Outcome::Done)
}
