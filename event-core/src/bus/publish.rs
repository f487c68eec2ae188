//! Publishing: events with their aggregate and metadata, into the store or the
//! in-memory queue.

use std::borrow::Cow;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::engine::DELIVERING;
use super::handler::{EventSource, Published, PublishedEvent};
use super::routing::BusEvent;
use super::{EventBus, Intake};
use crate::error::{Error, Result};
use crate::event::DomainEvent;
use crate::record::fresh_id;
use crate::record::{AppendRequest, ExpectedVersion, Metadata, NewEvent, RecordedEvent, StreamId};
use crate::store::EventStore;

/// An event to publish, with the aggregate it belongs to and its metadata. Plain events
/// are accepted too, so `publish(event)` works when the event marks its aggregate id.
#[derive(Debug, Clone)]
pub struct Outgoing<E> {
    event: E,
    aggregate_id: Option<String>,
    metadata: Metadata,
}

/// What `publish` takes: an event, or an [`Outgoing`] with its aggregate id and metadata.
pub trait IntoOutgoing<E> {
    /// The event ready to publish.
    fn into_outgoing(self) -> Outgoing<E>;
}

impl<E: DomainEvent> IntoOutgoing<E> for E {
    fn into_outgoing(self) -> Outgoing<E> {
        Outgoing::new(self)
    }
}

impl<E> IntoOutgoing<E> for Outgoing<E> {
    fn into_outgoing(self) -> Outgoing<E> {
        self
    }
}

impl<E> Outgoing<E> {
    /// An event to publish.
    pub fn new(event: E) -> Self {
        Outgoing {
            event,
            aggregate_id: None,
            metadata: Metadata::default(),
        }
    }

    /// Names the aggregate it belongs to (instead of a field marked `aggregate_id`).
    pub fn to(mut self, aggregate_id: impl Into<String>) -> Self {
        self.aggregate_id = Some(aggregate_id.into());
        self
    }

    /// Sets its metadata.
    pub fn metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// The event.
    pub fn event(&self) -> &E {
        &self.event
    }

    /// The event, without its aggregate id and metadata.
    pub fn into_event(self) -> E {
        self.event
    }

    /// An event resolved for publishing, as it was given (its aggregate id now explicit).
    fn resolved((aggregate_id, event, metadata): Resolved<E>) -> Self {
        Outgoing {
            event,
            aggregate_id: Some(aggregate_id),
            metadata,
        }
    }
}

/// Why [`EventBus::try_publish`] did not publish an event; every case gives the event back
/// (with its aggregate id and metadata), to publish again or keep, as tokio's
/// `TrySendError` does. Nothing was published.
#[non_exhaustive]
pub enum TryPublishError<E> {
    /// The queue of a bus without a store has no room now.
    Full(Outgoing<E>),
    /// The bus is stopped (or stopping): it accepts no more events.
    Stopped(Outgoing<E>),
    /// Publishing failed for another reason than room: the store refused or failed the
    /// append, the event has no aggregate id, or it does not serialize. The error says
    /// which.
    Failed(Outgoing<E>, Error),
}

impl<E> TryPublishError<E> {
    /// The event that was not published.
    pub fn into_inner(self) -> Outgoing<E> {
        match self {
            TryPublishError::Full(event)
            | TryPublishError::Stopped(event)
            | TryPublishError::Failed(event, _) => event,
        }
    }

    /// The error of a [`Failed`](Self::Failed) publication.
    pub fn error(&self) -> Option<&Error> {
        match self {
            TryPublishError::Failed(_, error) => Some(error),
            TryPublishError::Full(_) | TryPublishError::Stopped(_) => None,
        }
    }
}

// Not derived: the event type need not be `Debug` for the error to be an error.
impl<E> std::fmt::Debug for TryPublishError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TryPublishError::Full(_) => f.write_str("Full(..)"),
            TryPublishError::Stopped(_) => f.write_str("Stopped(..)"),
            TryPublishError::Failed(_, error) => {
                f.debug_tuple("Failed").field(&"..").field(error).finish()
            }
        }
    }
}

impl<E> std::fmt::Display for TryPublishError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TryPublishError::Full(_) => f.write_str("the bus queue is full"),
            TryPublishError::Stopped(_) => f.write_str("the event bus is stopped"),
            // A pure wrapper: the error speaks for itself.
            TryPublishError::Failed(_, error) => std::fmt::Display::fmt(error, f),
        }
    }
}

impl<E> std::error::Error for TryPublishError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TryPublishError::Failed(_, error) => std::error::Error::source(error),
            TryPublishError::Full(_) | TryPublishError::Stopped(_) => None,
        }
    }
}

/// An event with the aggregate id it is published to, and its metadata.
type Resolved<E> = (String, E, Metadata);

impl EventBus {
    /// Publishes one event. With a store it returns once the event is stored, with its
    /// global position; without, once it is queued (waiting for room), with its sequence
    /// number.
    ///
    /// A handler of a bus without a store that publishes into the same bus never waits for
    /// room (nor gets [`Error::QueueFull`]): when the queue is full, its events go in
    /// beyond the capacity. Waiting there could deadlock, with every slot held by an event
    /// whose handler waits for one; so the queue can exceed its capacity by what handlers
    /// publish.
    pub async fn publish<E: DomainEvent>(&self, event: impl IntoOutgoing<E>) -> Result<u64> {
        self.publish_one(event.into_outgoing(), true).await
    }

    /// Publishes one event without waiting for room: when the queue is full it fails at
    /// once with [`TryPublishError::Full`], giving the event back (a bus with a store never
    /// is full: its log is the queue). Every failure gives the event back.
    pub async fn try_publish<E: DomainEvent>(
        &self,
        event: impl IntoOutgoing<E>,
    ) -> std::result::Result<u64, TryPublishError<E>> {
        let outgoing = event.into_outgoing();
        if self.inner.stopped.load(Ordering::SeqCst) {
            return Err(TryPublishError::Stopped(outgoing));
        }
        let (aggregate_id, event, metadata) = resolve(outgoing)
            .map_err(|(outgoing, error)| TryPublishError::Failed(outgoing, error))?;
        let engine = &self.inner.engine;
        let position = match &engine.store {
            Some(store) => {
                // The metadata is copied so that a failed append can give it back.
                let stored =
                    append_one(store.as_ref(), &aggregate_id, &event, metadata.clone()).await;
                stored.map_err(|error| {
                    TryPublishError::Failed(
                        Outgoing::resolved((aggregate_id, event, metadata)),
                        error,
                    )
                })?
            }
            None => {
                match self
                    .publish_transient(std::iter::once((aggregate_id, event, metadata)), false)
                    .await
                {
                    Ok(range) => *range.start(),
                    Err((error, mut events)) => {
                        let Some(resolved) = events.next() else {
                            unreachable!("a refused publication gives its events back untouched")
                        };
                        let outgoing = Outgoing::resolved(resolved);
                        return Err(match error {
                            Error::QueueFull { .. } => TryPublishError::Full(outgoing),
                            Error::BusStopped => TryPublishError::Stopped(outgoing),
                            error => TryPublishError::Failed(outgoing, error),
                        });
                    }
                }
            }
        };
        engine.published.fetch_add(1, Ordering::Relaxed);
        Ok(position)
    }

    /// One event: without a store it goes straight to the queue, with no batch around it.
    async fn publish_one<E: DomainEvent>(&self, event: Outgoing<E>, wait: bool) -> Result<u64> {
        if self.inner.engine.store.is_some() {
            return Ok(*self.publish_all(vec![event], wait).await?.start());
        }
        if self.inner.stopped.load(Ordering::SeqCst) {
            return Err(Error::BusStopped);
        }
        let event = resolve(event).map_err(|(_, error)| error)?;
        let range = self
            .publish_transient(std::iter::once(event), wait)
            .await
            .map_err(|(error, _)| error)?;
        self.inner.engine.published.fetch_add(1, Ordering::Relaxed);
        Ok(*range.start())
    }

    /// Publishes several events, all or nothing: with a store they are appended in one
    /// atomic step; without, they are queued together once there is room for all of them.
    /// Without a store, a batch larger than the queue's capacity is refused with
    /// [`Error::QueueFull`], from anywhere; a batch that fits, published by a handler into
    /// its own bus, never waits and may go beyond the capacity (see
    /// [`publish`](Self::publish)).
    pub async fn publish_batch<E, I>(&self, events: I) -> Result<RangeInclusive<u64>>
    where
        E: DomainEvent,
        I: IntoIterator,
        I::Item: IntoOutgoing<E>,
    {
        let events: Vec<Outgoing<E>> = events.into_iter().map(|e| e.into_outgoing()).collect();
        self.publish_all(events, true).await
    }

    async fn publish_all<E: DomainEvent>(
        &self,
        events: Vec<Outgoing<E>>,
        wait: bool,
    ) -> Result<RangeInclusive<u64>> {
        if self.inner.stopped.load(Ordering::SeqCst) {
            return Err(Error::BusStopped);
        }
        if events.is_empty() {
            return Err(Error::InvalidAppend {
                reason: "nothing to publish".into(),
            });
        }
        // Every event is checked before any is accepted: all or nothing.
        let resolved = events
            .into_iter()
            .map(|event| resolve(event).map_err(|(_, error)| error))
            .collect::<Result<Vec<_>>>()?;
        let n = resolved.len() as u64;
        let range = match &self.inner.engine.store {
            Some(store) => publish_stored(store.as_ref(), resolved).await?,
            None => self
                .publish_transient(resolved.into_iter(), wait)
                .await
                .map_err(|(error, _)| error)?,
        };
        self.inner.engine.published.fetch_add(n, Ordering::Relaxed);
        Ok(range)
    }

    /// Queues events on a bus without a store. A refusal (no room, stopped) gives the
    /// events back untouched.
    async fn publish_transient<E: DomainEvent, I: ExactSizeIterator<Item = Resolved<E>>>(
        &self,
        events: I,
        wait: bool,
    ) -> std::result::Result<RangeInclusive<u64>, (Error, I)> {
        let engine = &self.inner.engine;
        let n = events.len();
        let in_own_handler = || {
            DELIVERING
                .try_with(|bus| *bus == engine.id())
                .unwrap_or(false)
        };
        let holds_room = match engine.room.take_for_publish(n, wait, in_own_handler).await {
            Ok(holds_room) => holds_room,
            Err(error) => return Err((error, events)),
        };
        let mut intake = self.inner.intake.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*intake, Intake::Closed) {
            return Err((Error::BusStopped, events));
        }
        let table = Arc::clone(&engine.routing.borrow());
        engine.room.entered(n as u64);
        let first = self.inner.sequence.fetch_add(n as u64, Ordering::Relaxed) + 1;
        for (i, (aggregate_id, event, metadata)) in events.enumerate() {
            let (event_id, now) = fresh_id();
            let record = RecordedEvent {
                event_id,
                aggregate_type: Cow::Borrowed(E::AGGREGATE_TYPE),
                aggregate_id,
                version: 0,
                position: first + i as u64,
                event_type: Cow::Borrowed(event.event_type()),
                schema_version: event.schema_version(),
                occurred_at: now,
                recorded_at: now,
                metadata,
                payload: String::new(),
            };
            let published: Arc<dyn PublishedEvent> = Arc::new(Published { record, event });
            let event = BusEvent::new(EventSource::Published(published));
            let event = if holds_room {
                event
            } else {
                event.without_room()
            };
            match &mut *intake {
                Intake::Waiting(waiting) => waiting.push(event),
                Intake::Routing(router) => router.route_published(engine, &table, event),
                Intake::Closed => unreachable!("checked above, under the same lock"),
            }
        }
        drop(intake);
        engine.reclaim();
        Ok(first..=first + n as u64 - 1)
    }
}

/// An event with the aggregate id it is published to: given, or from its marked field.
/// Without one, the event comes back with the error.
// Returned by value, not boxed: the refusal is the rare path, and the event must come back.
#[allow(clippy::result_large_err)]
fn resolve<E: DomainEvent>(
    mut outgoing: Outgoing<E>,
) -> std::result::Result<Resolved<E>, (Outgoing<E>, Error)> {
    match outgoing
        .aggregate_id
        .take()
        .or_else(|| outgoing.event.aggregate_id())
    {
        Some(id) => Ok((id, outgoing.event, outgoing.metadata)),
        None => {
            let error = Error::MissingAggregateId {
                event_type: outgoing.event.event_type().to_owned(),
            };
            Err((outgoing, error))
        }
    }
}

/// Appends one published event to the store, and returns its position.
async fn append_one<E: DomainEvent>(
    store: &dyn EventStore,
    aggregate_id: &str,
    event: &E,
    metadata: Metadata,
) -> Result<u64> {
    let request = AppendRequest {
        stream: StreamId::new(E::AGGREGATE_TYPE, aggregate_id),
        expected: ExpectedVersion::Any,
        events: vec![NewEvent::from_event(event, metadata)?],
    };
    let outcomes = store.append_batch(vec![request]).await?;
    match outcomes.first() {
        Some(outcome) => Ok(outcome.first_position),
        None => Err(Error::InvalidAppend {
            reason: "the store stored nothing".into(),
        }),
    }
}

/// Appends published events to the store in one atomic batch, one request per aggregate
/// (in the order of their first event), and returns their positions.
async fn publish_stored<E: DomainEvent>(
    store: &dyn EventStore,
    events: Vec<(String, E, Metadata)>,
) -> Result<RangeInclusive<u64>> {
    let mut requests: Vec<AppendRequest> = Vec::new();
    let mut by_aggregate: std::collections::HashMap<String, usize> = Default::default();
    for (aggregate_id, event, metadata) in events {
        let new = NewEvent::from_event(&event, metadata)?;
        // A run of events of one aggregate (the usual batch) needs no lookup.
        if let Some(last) = requests.last_mut()
            && last.stream.aggregate_id == aggregate_id
        {
            last.events.push(new);
            continue;
        }
        match by_aggregate.get(&aggregate_id) {
            Some(&i) => requests[i].events.push(new),
            None => {
                by_aggregate.insert(aggregate_id.clone(), requests.len());
                requests.push(AppendRequest {
                    stream: StreamId::new(E::AGGREGATE_TYPE, aggregate_id),
                    expected: ExpectedVersion::Any,
                    events: vec![new],
                });
            }
        }
    }
    let outcomes = store.append_batch(requests).await?;
    let first = outcomes.iter().map(|o| o.first_position).min();
    let last = outcomes.iter().map(|o| o.last_position).max();
    match (first, last) {
        (Some(first), Some(last)) => Ok(first..=last),
        _ => Err(Error::InvalidAppend {
            reason: "the store stored nothing".into(),
        }),
    }
}

/// Publishes events of type `E` without knowing what carries them, so domain services can
/// take an `Arc<dyn DomainEventPublisher<E>>` and tests can hand them a fake. [`EventBus`]
/// implements it for every event type.
#[async_trait::async_trait]
pub trait DomainEventPublisher<E: DomainEvent>: Send + Sync {
    /// Publishes one event; see [`EventBus::publish`].
    async fn publish_event(&self, event: Outgoing<E>) -> Result<u64>;

    /// Publishes events all or nothing; see [`EventBus::publish_batch`].
    async fn publish_events(&self, events: Vec<Outgoing<E>>) -> Result<RangeInclusive<u64>>;
}

#[async_trait::async_trait]
impl<E: DomainEvent> DomainEventPublisher<E> for EventBus {
    async fn publish_event(&self, event: Outgoing<E>) -> Result<u64> {
        self.publish(event).await
    }

    async fn publish_events(&self, events: Vec<Outgoing<E>>) -> Result<RangeInclusive<u64>> {
        self.publish_batch(events).await
    }
}
