//! The dispatcher of a bus with a store, and the saving of checkpoints.
//!
//! The dispatcher reads the global log from the lowest checkpoint of its subscriptions and
//! routes each event to the subscriptions that have not seen it. A subscription added
//! later rewinds the reader to its own checkpoint; the others skip what they already had.
//!
//! Every stored row a subscription would receive reaches it, one way or another:
//! - a row of one of its event types goes to a worker (where an event that does not
//!   decode is dead-lettered at once);
//! - a row of its aggregate type whose event type no code registers goes by its
//!   [`UnknownEventPolicy`](super::UnknownEventPolicy): a dead letter (the default), or a
//!   skip it counts;
//! - a row the store cannot read at all (damaged bytes, a field out of range) is
//!   dead-lettered by the dispatcher for every subscription that has not passed it,
//!   since no one can tell whose it was. The events before it in the same read are
//!   delivered, and reading goes on after it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use uuid::Uuid;

use super::engine::Engine;
use super::handler::EventSource;
use super::inbox::{Router, admit};
use super::routing::{BusEvent, Routing, Sub, partition_of};
use super::stats::Counters;
use crate::error::{Error, Result, StoreErrorKind};
use crate::record::{FailureRecord, NewDeadLetter, RecordedEvent};
use crate::registry::registry;
use crate::store::EventStore;

/// Reads the log and routes its events until the bus stops.
pub(crate) async fn dispatch_log(engine: Arc<Engine>, mut router: Router) {
    let store = Arc::clone(engine.store.as_ref().expect("a bus with a store"));
    let mut head = store.watch_head();
    let mut routing = engine.routing.subscribe();
    let mut stopping = engine.stopping.subscribe();
    let mut next = u64::MAX;
    let mut table = Arc::new(Routing::default());
    loop {
        if *stopping.borrow() {
            break;
        }
        let current = Arc::clone(&routing.borrow_and_update());
        let segments = engine.segments_version.load(Ordering::SeqCst);
        if !Arc::ptr_eq(&current, &table)
            || next == u64::MAX
            || segments != engine.segments_seen.load(Ordering::SeqCst)
        {
            table = current;
            sync_tracker(&engine, &store, &table).await;
            let lowest = engine.lock_tracker().lowest_routed();
            next = next.min(lowest.map_or(u64::MAX - 1, |p| p + 1));
            engine.read_next.store(next, Ordering::SeqCst);
            engine.routing_seen.store(table.version, Ordering::SeqCst);
            engine.segments_seen.store(segments, Ordering::SeqCst);
        }
        let head_now = engine.head(*head.borrow_and_update());
        if table.subs.is_empty() || next > head_now {
            let caught_up = if table.subs.is_empty() {
                head_now + 1
            } else {
                next
            };
            engine.read_next.store(caught_up, Ordering::SeqCst);
            engine.progress.notify_waiters();
            tokio::select! {
                _ = head.changed() => {}
                () = engine.head_reported.notified() => {}
                () = engine.segments_changed.notified() => {}
                _ = routing.changed() => {}
                _ = stopping.changed() => {}
            }
            continue;
        }
        // Wait for room before reading, so the window of events in memory stays bounded.
        let has_room = tokio::select! {
            room = engine.room.wait_for_one() => room,
            _ = stopping.changed() => continue,
        };
        if !has_room {
            continue;
        }
        let limit = engine.room.available().clamp(1, engine.batch_size);
        let page = match read_page(store.as_ref(), next, limit).await {
            Ok(page) => page,
            Err(error) => {
                tracing::error!(%error, position = next, "cannot read the event log; retrying");
                if wait_or_stop(&mut stopping, Duration::from_millis(500)).await {
                    break;
                }
                continue;
            }
        };
        let routed_upto = match (&page.damaged, page.events.last()) {
            (Some(damaged), _) => damaged.position - 1,
            (None, Some(last)) => last.position,
            (None, None) => {
                // The head moved past what the log holds (another writer's append is not
                // visible yet); wait for the next change.
                engine.read_next.store(next, Ordering::SeqCst);
                continue;
            }
        };
        let admitted = admit_page(&engine, &table, page.events, routed_upto);
        if !route_admitted(&engine, &mut router, &mut stopping, admitted).await {
            // Not routed: the tracker keeps these positions open, so the checkpoint
            // stays below them and they are read again next time.
            break;
        }
        next = routed_upto + 1;
        if let Some(damaged) = page.damaged {
            if !dead_letter_damaged(&engine, &table, &damaged).await {
                engine.read_next.store(next, Ordering::SeqCst);
                if wait_or_stop(&mut stopping, Duration::from_millis(500)).await {
                    break;
                }
                continue;
            }
            next = damaged.position + 1;
        }
        engine.read_next.store(next, Ordering::SeqCst);
    }
}

/// Picks the subscriptions of each read event and marks them out for delivery; positions
/// up to `routed_upto` are then passed for everyone else.
fn admit_page(
    engine: &Engine,
    table: &Routing,
    page: Vec<RecordedEvent>,
    routed_upto: u64,
) -> Vec<(BusEvent, Arc<[Arc<Sub>]>)> {
    let mut admitted = Vec::new();
    let mut tracker = engine.lock_tracker();
    for record in page {
        let candidates = match table.route(&record.event_type) {
            Some(candidates) => candidates,
            // A type nobody subscribes to, but that some code registers: not theirs.
            None if registry().get(&record.event_type).is_some() => continue,
            // A type no code registers: the subscriptions of its aggregate type would
            // receive it if they knew it. Those that skip such events count the skip.
            None => {
                let partition =
                    partition_if_segmented(table.skipping_unknown(&record.aggregate_type), &record);
                for sub in table.skipping_unknown(&record.aggregate_type) {
                    if tracker.wants((sub.index, sub.segment_of(partition)), record.position) {
                        Counters::add(&sub.counters.skipped, 1);
                        sub.metrics.skipped.increment(1);
                    }
                }
                match table.route_unknown(&record.aggregate_type) {
                    Some(candidates) => candidates,
                    None => continue,
                }
            }
        };
        let partition = partition_if_segmented(candidates, &record);
        let key = |s: &Sub| (s.index, s.segment_of(partition));
        // Usually every candidate wants the event: share the table's list then.
        let subs: Arc<[Arc<Sub>]> = if candidates
            .iter()
            .all(|s| tracker.wants(key(s), record.position))
        {
            Arc::clone(candidates)
        } else {
            candidates
                .iter()
                .filter(|s| tracker.wants(key(s), record.position))
                .cloned()
                .collect()
        };
        if subs.is_empty() {
            continue;
        }
        for sub in subs.iter() {
            tracker.route(key(sub), record.position);
        }
        let mut event = BusEvent::new(EventSource::Stored(Arc::new(record)));
        event.partition = partition;
        admitted.push((event, subs));
    }
    if tracker.routed_through(routed_upto) {
        engine.checkpoints_dirty.notify_one();
    }
    admitted
}

/// The record's partition hash if one of `subs` has segments (else 0: unused).
fn partition_if_segmented(subs: &[Arc<Sub>], record: &RecordedEvent) -> u32 {
    if subs.iter().any(|s| s.segments > 1) {
        partition_of(record)
    } else {
        0
    }
}

/// Hands admitted events to the workers as room allows; false if the bus stopped first.
async fn route_admitted(
    engine: &Engine,
    router: &mut Router,
    stopping: &mut watch::Receiver<bool>,
    admitted: Vec<(BusEvent, Arc<[Arc<Sub>]>)>,
) -> bool {
    // Room bounds the events in memory; it comes back as events finish. Taking it a
    // chunk at a time wakes the dispatcher once per chunk, not once per event.
    let chunk = (engine.room.capacity() / 4).max(1);
    let mut admitted = admitted.into_iter();
    while admitted.len() > 0 {
        let n = admitted.len().min(chunk);
        tokio::select! {
            () = engine.room.take_for_read(n) => {}
            _ = stopping.changed() => return false,
        }
        engine.room.entered(n as u64);
        for (mut event, subs) in admitted.by_ref().take(n) {
            if admit(engine, &mut event, &subs) {
                router.push(event, subs);
            }
        }
    }
    true
}

/// A stored row the store cannot read back.
pub(crate) struct Damaged {
    pub(crate) position: u64,
    event_id: Option<Uuid>,
    error: String,
}

/// What one read of the log gave: the readable events, and the damaged row that ended
/// the read early, if one did.
pub(crate) struct Page {
    pub(crate) events: Vec<RecordedEvent>,
    pub(crate) damaged: Option<Damaged>,
}

/// Reads up to `limit` events from `from`. When a row cannot be read, the read stops
/// there: the rows before it are returned with it. The row is the one the error names,
/// or, if the store's error names none, the one found by reading fewer rows at a time
/// (the shortest read that fails ends with it). Other errors (busy, I/O, closed) are
/// returned, to be tried again.
pub(crate) async fn read_page(store: &dyn EventStore, from: u64, limit: usize) -> Result<Page> {
    let error = match store.read_all(from, limit).await {
        Ok(events) => {
            return Ok(Page {
                events,
                damaged: None,
            });
        }
        Err(error) => error,
    };
    if let Some(page) = before_located(store, from, &error).await? {
        return Ok(page);
    }
    if error.store_kind() != Some(StoreErrorKind::Corrupt) {
        return Err(error);
    }
    // read_all(from, good) succeeds and read_all(from, bad) fails.
    let (mut good, mut good_events, mut bad, mut bad_error) = (0, Vec::new(), limit, error);
    while bad - good > 1 {
        let mid = good + (bad - good) / 2;
        match store.read_all(from, mid).await {
            Ok(events) => (good, good_events) = (mid, events),
            Err(error) => {
                if let Some(page) = before_located(store, from, &error).await? {
                    return Ok(page);
                }
                if error.store_kind() != Some(StoreErrorKind::Corrupt) {
                    return Err(error);
                }
                (bad, bad_error) = (mid, error);
            }
        }
    }
    // Positions have no gaps: the damaged row follows the last good one.
    let position = good_events.last().map_or(from, |e| e.position + 1);
    Ok(Page {
        events: good_events,
        damaged: Some(Damaged {
            position,
            event_id: None,
            error: crate::error::error_chain(&bad_error),
        }),
    })
}

/// If `error` names a damaged row at or after `from`: the page of the rows before it.
async fn before_located(store: &dyn EventStore, from: u64, error: &Error) -> Result<Option<Page>> {
    let Some((event_id, position)) = error.stored_event() else {
        return Ok(None);
    };
    if position < from {
        return Ok(None);
    }
    let events = match usize::try_from(position - from) {
        Ok(0) => Vec::new(),
        Ok(n) => store.read_all(from, n).await?,
        Err(_) => return Ok(None),
    };
    Ok(Some(Page {
        events,
        damaged: Some(Damaged {
            position,
            event_id,
            error: crate::error::error_chain(error),
        }),
    }))
}

/// Dead-letters a damaged row for every subscription that has not passed it (the
/// dead letter's event id is the row's when it can be read, else the nil UUID, and its
/// event type is empty). False if a dead letter could not be stored: those
/// subscriptions stay before the row, and it is read again.
async fn dead_letter_damaged(engine: &Engine, table: &Routing, damaged: &Damaged) -> bool {
    let position = damaged.position;
    let event_id = damaged.event_id.unwrap_or(Uuid::nil());
    tracing::error!(
        position,
        %event_id,
        error = %damaged.error,
        "a stored event cannot be read; it is dead-lettered"
    );
    let mut all_stored = true;
    for sub in &table.subs {
        if !engine.lock_tracker().any_wants(sub.index, position) {
            continue;
        }
        let now = engine.clock.now();
        let dead_letter = NewDeadLetter {
            subscription: sub.name.to_string(),
            event_id,
            position,
            event_type: String::new(),
            error: damaged.error.clone(),
            attempts: 1,
            first_failed_at: now,
            last_failed_at: now,
        };
        let failure = FailureRecord {
            subscription: sub.name.to_string(),
            event_id,
            position,
            attempt: 1,
            error: damaged.error.clone(),
            duration_micros: 0,
            failed_at: now,
        };
        if let Err(error) = engine
            .records
            .record_failure(failure, sub.failure_retention)
            .await
        {
            tracing::error!(%error, "cannot store a failure record");
        }
        match engine.records.add_dead_letter(dead_letter, None).await {
            Ok(()) => {
                sub.metrics.failed.increment(1);
                sub.metrics.dead_letters.increment(1);
                Counters::add(&sub.counters.failed, 1);
                Counters::add(&engine.counters.failed, 1);
                Counters::add(&sub.counters.dead_lettered, 1);
                Counters::add(&engine.counters.dead_lettered, 1);
                if engine.lock_tracker().pass(sub.index, position) {
                    engine.checkpoints_dirty.notify_one();
                }
            }
            Err(error) => {
                tracing::error!(%error, "cannot store a dead letter; trying again");
                all_stored = false;
            }
        }
    }
    all_stored
}

/// Takes up the segments the lease keeper claimed (at their checkpoints: the reader then
/// rewinds to the lowest), and drops the tracks of subscriptions that left, releasing
/// their leases. Done here, between reads, so a segment taken up mid-read cannot have
/// positions below the reader passed for it.
async fn sync_tracker(engine: &Engine, store: &Arc<dyn EventStore>, table: &Routing) {
    let claimed = std::mem::take(&mut *engine.claimed.lock().unwrap_or_else(|e| e.into_inner()));
    let released = {
        let mut tracker = engine.lock_tracker();
        let mut released = Vec::new();
        for key in tracker.keys() {
            if !table.subs.iter().any(|s| s.index == key.0) {
                released.extend(tracker.remove(key));
            }
        }
        for claim in claimed {
            let Some(sub) = table.subs.iter().find(|s| s.index == claim.index) else {
                released.push(claim.lease);
                continue;
            };
            let key = (sub.index, claim.lease.segment);
            let epoch = claim.lease.epoch;
            if claim.run_until <= tokio::time::Instant::now() {
                // Its time ran out before it was taken up (the keeper's renewals only
                // cover held segments): given back, to be claimed again.
                released.push(claim.lease);
                continue;
            }
            tracker.add(key, Arc::clone(&sub.name), claim.lease, claim.checkpoint);
            tracker.run_until(key, epoch, claim.run_until);
            sub.set_held(key.1, Some(epoch));
        }
        released
    };
    if !released.is_empty()
        && let Err(error) = store.release_leases(&released).await
    {
        // They expire on their own.
        tracing::warn!(%error, "cannot release the leases of subscriptions that left");
    }
}

/// Sleeps for `delay` unless the bus stops first; true if it stops.
async fn wait_or_stop(stopping: &mut watch::Receiver<bool>, delay: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => *stopping.borrow(),
        _ = stopping.changed() => true,
    }
}

/// How often a running bus hands its per-event counts to the metrics recorder.
const METRICS_CATCH_UP: Duration = Duration::from_secs(1);

/// Hands the per-event counts to the metrics recorder every [`METRICS_CATCH_UP`] until the
/// bus stops (which catches up once more when its tasks are done).
pub(crate) async fn catch_up_metrics(engine: Arc<Engine>) {
    let mut stopping = engine.stopping.subscribe();
    while !wait_or_stop(&mut stopping, METRICS_CATCH_UP).await {
        engine.catch_up_metrics();
    }
}

/// Saves moved checkpoints whenever deliveries finish; changes that arrive during a save
/// are folded into the next one. A failed save is retried: it only delays the checkpoint.
pub(crate) async fn flush_checkpoints(engine: Arc<Engine>) {
    let mut stopping = engine.stopping.subscribe();
    loop {
        if *stopping.borrow_and_update() {
            return;
        }
        tokio::select! {
            _ = engine.checkpoints_dirty.notified() => {}
            _ = stopping.changed() => return,
        }
        if let Err(error) = save_checkpoints(&engine).await {
            tracing::warn!(%error, "cannot save subscription checkpoints; retrying");
            if wait_or_stop(&mut stopping, Duration::from_millis(200)).await {
                return;
            }
            engine.checkpoints_dirty.notify_one();
        }
    }
}

/// Saves every checkpoint that moved since its last save.
pub(crate) async fn save_checkpoints(engine: &Engine) -> Result<()> {
    let Some(store) = &engine.store else {
        return Ok(());
    };
    let _gate = engine.checkpoint_gate.lock().await;
    let unsaved = engine.lock_tracker().unsaved();
    if unsaved.is_empty() {
        return Ok(());
    }
    // Asked for all at once, so a store that groups its writes saves them in one
    // transaction: one by one, a SQLite store committed (and synced) each segment's
    // checkpoint on its own, 16 in turn at the end of a run of 16 segments.
    let saves: Vec<_> = unsaved
        .iter()
        .map(|(_, lease, position)| store.save_segment_checkpoint(lease, *position))
        .collect();
    let results = join_all(saves).await;
    let mut moved = Vec::with_capacity(unsaved.len());
    let mut failed = None;
    for ((key, lease, position), result) in unsaved.into_iter().zip(results) {
        match result {
            Ok(()) => {
                engine.lock_tracker().saved(key, position);
                moved.push(key.0);
            }
            // Another member holds the segment now: it goes on from the checkpoint it
            // found, and this bus stops running the segment.
            Err(Error::LeaseLost { .. }) => engine.segment_lost(key, &lease),
            Err(error) => {
                failed.get_or_insert(error);
            }
        }
    }
    let head = *store.watch_head().borrow();
    record_checkpoints(engine, head, &moved);
    failed.map_or(Ok(()), Err)
}

/// Runs the futures side by side; their outputs, in their order.
async fn join_all<F: std::future::Future + Unpin>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Some).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if let Some(running) = future {
                match std::pin::Pin::new(running).poll(cx) {
                    std::task::Poll::Ready(value) => {
                        *output = Some(value);
                        *future = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs
        .into_iter()
        .map(|output| output.expect("every future finished"))
        .collect()
}

/// Sets the checkpoint and lag gauges of the subscriptions whose checkpoints moved, from
/// the lowest checkpoint of the segments this bus runs and the head as the store reports it.
fn record_checkpoints(engine: &Engine, head: u64, moved: &[usize]) {
    let routing = Arc::clone(&engine.routing.borrow());
    let tracker = engine.lock_tracker();
    for sub in routing.subs.iter().filter(|s| moved.contains(&s.index)) {
        if let Some(checkpoint) = tracker.lowest_checkpoint(sub.index) {
            sub.metrics.checkpoint.set(checkpoint as f64);
            sub.metrics.lag.set(head.saturating_sub(checkpoint) as f64);
        }
    }
}
