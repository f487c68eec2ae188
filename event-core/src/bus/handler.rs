//! Handlers, what they receive, and the type-erased invocation the workers run.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use crate::error::{BoxError, Error, Result};
use crate::event::DomainEvent;
use crate::record::RecordedEvent;
use crate::registry::registry;

/// A boxed, sendable future, as handlers return them.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// One delivery of an event to a subscription: the event (also reachable through
/// `Deref`), its record, and the attempt number. Cloning it is cheap.
pub struct Delivery<E> {
    source: Source<E>,
    attempt: u32,
    lease_epoch: Option<u64>,
}

/// Where a delivery's event comes from.
enum Source<E> {
    /// Published on a bus without a store: the event and its record share one allocation.
    Published(Arc<Published<E>>),
    /// Read from the store and decoded for this subscription.
    Stored {
        event: Arc<E>,
        record: Arc<RecordedEvent>,
    },
}

/// An event published on a bus without a store, with the record the bus made for it.
pub(crate) struct Published<E> {
    pub(crate) record: RecordedEvent,
    pub(crate) event: E,
}

/// A [`Published`] event with its type erased, as the workers carry it.
pub(crate) trait PublishedEvent: Send + Sync + 'static {
    fn record(&self) -> &RecordedEvent;
    /// The event's stored form (a transient bus fills no payload into its record).
    fn to_payload(&self) -> Result<String>;
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

impl<E: DomainEvent> PublishedEvent for Published<E> {
    fn record(&self) -> &RecordedEvent {
        &self.record
    }
    fn to_payload(&self) -> Result<String> {
        self.event.to_payload().map_err(|source| Error::Serialize {
            event_type: self.event.event_type().to_owned(),
            source,
        })
    }
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

/// An event as the engine carries it: read from the store, or published without one.
#[derive(Clone)]
pub(crate) enum EventSource {
    Stored(Arc<RecordedEvent>),
    Published(Arc<dyn PublishedEvent>),
}

impl EventSource {
    pub(crate) fn record(&self) -> &RecordedEvent {
        match self {
            EventSource::Stored(record) => record,
            EventSource::Published(published) => published.record(),
        }
    }
}

impl<E> Delivery<E> {
    /// The event.
    pub fn event(&self) -> &E {
        match &self.source {
            Source::Published(published) => &published.event,
            Source::Stored { event, .. } => event,
        }
    }

    /// The event as recorded: its id (use it to make a handler idempotent), stream,
    /// version, position, times and metadata. On a bus without a store, `version` is 0,
    /// `position` is the bus's own sequence number and `payload` is empty.
    pub fn record(&self) -> &RecordedEvent {
        match &self.source {
            Source::Published(published) => &published.record,
            Source::Stored { record, .. } => record,
        }
    }

    /// Which attempt this is, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The fencing epoch of the segment lease under which this bus delivers the event
    /// ([`SegmentLease::epoch`](crate::lease::SegmentLease::epoch)) when the attempt
    /// started: every claim of a segment raises its epoch, so deliveries of one segment
    /// with one epoch all come from one member. `None` on a bus without a store (it runs
    /// every segment without leases) and for a dead letter replayed by hand.
    pub fn lease_epoch(&self) -> Option<u64> {
        self.lease_epoch
    }
}

impl<E> Clone for Delivery<E> {
    fn clone(&self) -> Self {
        let source = match &self.source {
            Source::Published(published) => Source::Published(Arc::clone(published)),
            Source::Stored { event, record } => Source::Stored {
                event: Arc::clone(event),
                record: Arc::clone(record),
            },
        };
        Delivery {
            source,
            attempt: self.attempt,
            lease_epoch: self.lease_epoch,
        }
    }
}

impl<E: fmt::Debug> fmt::Debug for Delivery<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("event", self.event())
            .field("record", self.record())
            .field("attempt", &self.attempt)
            .field("lease_epoch", &self.lease_epoch)
            .finish()
    }
}

impl<E> std::ops::Deref for Delivery<E> {
    type Target = E;
    fn deref(&self) -> &E {
        self.event()
    }
}

/// What a handler returns: `()`, or `Result<(), E>` for any error type `E` that converts
/// into [`BoxError`] (`std::io::Error`, `String`, `&str`, `Box<dyn Error>`, your own error,
/// `anyhow::Error` through `Into<BoxError>`...). An `Err` is a failed attempt.
///
/// Sealed: the bus decides what counts as a failure.
pub trait HandlerOutcome: sealed::Sealed + Send + 'static {
    /// The outcome as the bus keeps it.
    fn into_result(self) -> std::result::Result<(), BoxError>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for () {}
    impl<Err> Sealed for Result<(), Err> {}
}

impl HandlerOutcome for () {
    fn into_result(self) -> std::result::Result<(), BoxError> {
        Ok(())
    }
}

impl<Err: Into<BoxError> + Send + 'static> HandlerOutcome for std::result::Result<(), Err> {
    fn into_result(self) -> std::result::Result<(), BoxError> {
        self.map_err(Into::into)
    }
}

/// An async event handler. Any `Fn(Delivery<E>) -> impl Future` whose output is a
/// [`HandlerOutcome`] (`()`, or `Result<(), Err>` with `Err: Into<BoxError>`) is one.
///
/// Delivery is at least once: after a crash, or a failed checkpoint write, a handler may
/// see an event again. Use `delivery.record().event_id` to make it idempotent.
pub trait Handler<E>: Send + Sync + 'static {
    /// Handles one delivery; an error (or a panic) is a failed attempt.
    fn handle(&self, delivery: Delivery<E>) -> BoxFuture<std::result::Result<(), BoxError>>;
}

impl<E, F, Fut> Handler<E> for F
where
    E: Send + Sync + 'static,
    F: Fn(Delivery<E>) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: HandlerOutcome,
{
    fn handle(&self, delivery: Delivery<E>) -> BoxFuture<std::result::Result<(), BoxError>> {
        let fut = self(delivery);
        Box::pin(async move { fut.await.into_result() })
    }
}

/// A handler that blocks (synchronous I/O, heavy computation); the bus runs it on a
/// thread of its own (see [`blocking`](super::blocking)) so it never stalls a worker, and
/// a stuck one never keeps the process from exiting.
pub(crate) struct Blocking<F>(pub(crate) Arc<F>);

impl<E, F, Out> Handler<E> for Blocking<F>
where
    E: Send + Sync + 'static,
    F: Fn(Delivery<E>) -> Out + Send + Sync + 'static,
    Out: HandlerOutcome,
{
    fn handle(&self, delivery: Delivery<E>) -> BoxFuture<std::result::Result<(), BoxError>> {
        let f = Arc::clone(&self.0);
        Box::pin(async move {
            let (tx, rx) = tokio::sync::oneshot::channel();
            super::blocking::run(Box::new(move || {
                // The attempt timed out (or the bus stopped) before a thread was free.
                if tx.is_closed() {
                    return;
                }
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| f(delivery)))
                    .map_err(|panic| BoxError::from(panic_message(panic)))
                    .and_then(HandlerOutcome::into_result);
                let _ = tx.send(result);
            }))?;
            match rx.await {
                Ok(result) => result,
                Err(_) => Err("the blocking handler's thread ended without an answer".into()),
            }
        })
    }
}

/// What a worker hands an event to: decodes (or downcasts) it for one subscription's
/// handler and calls it.
pub(crate) trait Invoke: Send + Sync + 'static {
    /// Starts one attempt (under the segment lease of `lease_epoch`, if any), or fails at
    /// once if the event cannot be decoded.
    fn invoke(
        &self,
        event: &EventSource,
        attempt: u32,
        lease_epoch: Option<u64>,
    ) -> Result<BoxFuture<std::result::Result<(), BoxError>>>;

    /// Serializes an event published on a bus without a store (to keep it with its dead
    /// letter).
    fn encode(&self, event: &dyn PublishedEvent) -> Result<String>;
}

pub(crate) struct Typed<E, H> {
    pub(crate) handler: H,
    pub(crate) _event: std::marker::PhantomData<fn(E)>,
}

impl<E: DomainEvent, H: Handler<E>> Invoke for Typed<E, H> {
    fn invoke(
        &self,
        event: &EventSource,
        attempt: u32,
        lease_epoch: Option<u64>,
    ) -> Result<BoxFuture<std::result::Result<(), BoxError>>> {
        let source = match event {
            EventSource::Published(published) => {
                match Arc::clone(published).into_any().downcast::<Published<E>>() {
                    Ok(published) => Source::Published(published),
                    // Another Rust type under this event's name (a group and its member, or a
                    // type that decoding refuses): through the stored form, which a
                    // transient bus's record does not carry.
                    Err(_) => {
                        let record = published.record();
                        let payload;
                        let payload = if record.payload.is_empty() {
                            payload = published.to_payload()?;
                            &payload
                        } else {
                            &record.payload
                        };
                        let event = registry().decode::<E>(
                            &record.event_type,
                            record.schema_version,
                            payload,
                        )?;
                        Source::Stored {
                            event: Arc::new(event),
                            record: Arc::new(record.clone()),
                        }
                    }
                }
            }
            EventSource::Stored(record) => Source::Stored {
                event: Arc::new(record.decode::<E>()?),
                record: Arc::clone(record),
            },
        };
        Ok(self.handler.handle(Delivery {
            source,
            attempt,
            lease_epoch,
        }))
    }

    fn encode(&self, event: &dyn PublishedEvent) -> Result<String> {
        // The published event, which may be of another Rust type than `E` (a group's
        // member published to a subscription of the group, or the other way round).
        event.to_payload()
    }
}

/// A panic's payload as the text of a failed attempt.
pub(crate) fn panic_message(panic: Box<dyn Any + Send>) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic".to_owned());
    format!("handler panicked: {text}")
}
