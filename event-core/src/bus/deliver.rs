//! One attempt of one delivery, and what follows from it: the routine that workers and
//! dead-letter replays share.
//!
//! An attempt calls the subscription's handler and runs the future it returns, inside the
//! bus's [`DELIVERING`] scope, with every panic caught (in the call that makes the future,
//! in its polls and in its drop) and with the subscription's timeout: a panic, an error or
//! a timeout is a failed attempt, and nothing a handler does takes its worker down.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::Span;

use super::engine::{DELIVERING, Engine};
use super::handler::{BoxFuture, EventSource, panic_message};
use super::records::Records;
use super::routing::Sub;
use super::stats::Counters;
use crate::error::{BoxError, Result};
use crate::record::{FailureRecord, NewDeadLetter, RecordedEvent};

/// Why an attempt failed, and whether another attempt could succeed.
pub(crate) struct Failure {
    pub(crate) message: String,
    /// False for an event that does not decode: it will not on a retry either.
    pub(crate) retryable: bool,
}

/// How an attempt ended, and how long it ran.
pub(crate) struct Outcome {
    pub(crate) result: std::result::Result<(), Failure>,
    pub(crate) elapsed: Duration,
}

enum State {
    Running(BoxFuture<std::result::Result<(), BoxError>>),
    Failed(Failure),
    Over,
}

/// An attempt under way; a future of its [`Outcome`].
pub(crate) struct Attempt {
    bus: usize,
    state: State,
    timeout: Duration,
    /// Started at the attempt's first wait (or its second, see
    /// [`poll_unarmed`](Attempt::poll_unarmed)), so a handler that finishes at once never
    /// touches the timer wheel.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The poll under way is one that does not start the deadline.
    unarmed: bool,
    span: Option<Span>,
    // The wall clock, not tokio's (which paused time stops, and which takes a lock per
    // reading when tokio's test-util is on): latency is real time.
    started: std::time::Instant,
}

/// Starts attempt number `attempt` of `event` for `sub` on the bus `bus`, under the
/// segment lease of `lease_epoch` if one is held.
pub(crate) fn begin(
    bus: usize,
    sub: &Sub,
    event: &EventSource,
    attempt: u32,
    lease_epoch: Option<u64>,
) -> Attempt {
    let started = std::time::Instant::now();
    let state = match catch_unwind(AssertUnwindSafe(|| {
        sub.invoke.invoke(event, attempt, lease_epoch)
    })) {
        Ok(Ok(handler)) => State::Running(handler),
        // An event that does not decode will not decode on a retry either.
        Ok(Err(error)) => State::Failed(Failure {
            message: crate::error::error_chain(&error),
            retryable: false,
        }),
        // The handler panicked before it returned its future.
        Err(panic) => State::Failed(Failure {
            message: panic_message(panic),
            retryable: true,
        }),
    };
    let record = event.record();
    let span = tracing::debug_span!(
        "eventfold.deliver",
        subscription = %sub.name,
        event_type = %record.event_type,
        position = record.position,
        attempt,
    );
    Attempt {
        bus,
        state,
        timeout: sub.timeout,
        deadline: None,
        unarmed: false,
        // A disabled span costs nothing to create, but entering it around every poll
        // does: keep it only when a subscriber wants it.
        span: (!span.is_disabled()).then_some(span),
        started,
    }
}

impl Future for Attempt {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let this = self.get_mut();
        let _entered = this.span.as_ref().map(Span::enter);
        let result = match &mut this.state {
            State::Over => return Poll::Pending,
            State::Failed(_) => match std::mem::replace(&mut this.state, State::Over) {
                State::Failed(failure) => Err(failure),
                _ => unreachable!("matched above"),
            },
            State::Running(handler) => {
                let bus = this.bus;
                // Marks the handler's task as delivering for this bus (see `publish`).
                let polled = catch_unwind(AssertUnwindSafe(|| {
                    DELIVERING.sync_scope(bus, || handler.as_mut().poll(cx))
                }));
                match polled {
                    Ok(Poll::Ready(Ok(()))) => Ok(()),
                    Ok(Poll::Ready(Err(error))) => Err(Failure {
                        message: crate::error::error_chain(&*error),
                        retryable: true,
                    }),
                    Err(panic) => Err(Failure {
                        message: panic_message(panic),
                        retryable: true,
                    }),
                    Ok(Poll::Pending) if this.unarmed && this.deadline.is_none() => {
                        return Poll::Pending;
                    }
                    Ok(Poll::Pending) => {
                        let timeout = this.timeout;
                        let deadline = this
                            .deadline
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                        if deadline.as_mut().poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                        Err(Failure {
                            message: format!(
                                "the handler did not finish within its timeout of {timeout:?}"
                            ),
                            retryable: true,
                        })
                    }
                }
            }
        };
        // The handler's future is dropped here, where a panic in its drop is caught too.
        let state = std::mem::replace(&mut this.state, State::Over);
        let result = match catch_unwind(AssertUnwindSafe(|| drop(state))) {
            Ok(()) => result,
            Err(panic) => Err(Failure {
                message: panic_message(panic),
                retryable: true,
            }),
        };
        Poll::Ready(Outcome {
            result,
            elapsed: this.started.elapsed(),
        })
    }
}

impl Attempt {
    /// Polls the attempt without starting its deadline if the handler is pending: for a
    /// caller that polls it again at once, with the waker it keeps it under (the worker's
    /// running attempts). Most handlers that wait at all are done by that second poll
    /// (they waited for a yield or a message already there), so they never touch the timer
    /// wheel; the deadline starts at the first pending poll after this one.
    pub(crate) fn poll_unarmed(&mut self, cx: &mut Context<'_>) -> Poll<Outcome> {
        self.unarmed = true;
        let polled = Pin::new(&mut *self).poll(cx);
        self.unarmed = false;
        polled
    }
}

/// Polls an attempt once, without starting its deadline ([`Attempt::poll_unarmed`]): its
/// outcome if it finished at once (most handlers do), or the attempt to run on, which the
/// caller polls again at once.
pub(crate) async fn poll_once(mut attempt: Attempt) -> std::result::Result<Outcome, Attempt> {
    let polled = std::future::poll_fn(|cx| Poll::Ready(attempt.poll_unarmed(cx))).await;
    match polled {
        Poll::Ready(outcome) => Ok(outcome),
        Poll::Pending => Err(attempt),
    }
}

/// Counts a successful attempt.
pub(crate) fn delivered(engine: &Engine, sub: &Sub, elapsed: Duration) {
    sub.latency.record(elapsed);
    Counters::add(&sub.counters.delivered, 1);
    Counters::add(&engine.counters.delivered, 1);
}

/// Counts a failed attempt and records it (bounded by the subscription's failure
/// retention); returns the failure with its time.
pub(crate) async fn failed(
    engine: &Engine,
    sub: &Sub,
    record: &RecordedEvent,
    attempt: u32,
    failure: Failure,
    elapsed: Duration,
) -> (Failure, DateTime<Utc>) {
    sub.latency.record(elapsed);
    sub.metrics.failed.increment(1);
    Counters::add(&sub.counters.failed, 1);
    Counters::add(&engine.counters.failed, 1);
    let now = engine.clock.now();
    tracing::warn!(
        subscription = %sub.name,
        event_id = %record.event_id,
        position = record.position,
        attempt,
        error = %failure.message,
        "delivery failed"
    );
    let stored = engine
        .records
        .record_failure(
            FailureRecord {
                subscription: sub.name.to_string(),
                event_id: record.event_id,
                position: record.position,
                attempt,
                error: failure.message.clone(),
                duration_micros: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
                failed_at: now,
            },
            sub.failure_retention,
        )
        .await;
    if let Err(store_error) = stored {
        tracing::error!(%store_error, "cannot store a failure record");
    }
    (failure, now)
}

/// What a dead letter says about a delivery given up.
pub(crate) struct GiveUp<'a> {
    pub(crate) attempts: u32,
    pub(crate) first_failed_at: Option<DateTime<Utc>>,
    pub(crate) error: &'a str,
}

/// Stores the dead letter of a delivery given up, and counts it. Without a store the
/// event itself, serialized now, is kept beside it so it can be replayed.
pub(crate) async fn dead_letter(
    engine: &Engine,
    sub: &Sub,
    event: &EventSource,
    give_up: GiveUp<'_>,
) -> Result<()> {
    let record = event.record();
    let now = engine.clock.now();
    let dead_letter = NewDeadLetter {
        subscription: sub.name.to_string(),
        event_id: record.event_id,
        position: record.position,
        event_type: record.event_type.to_string(),
        error: give_up.error.to_owned(),
        attempts: give_up.attempts,
        first_failed_at: give_up.first_failed_at.unwrap_or(now),
        last_failed_at: now,
    };
    let kept = match (event, &engine.records) {
        (EventSource::Published(published), Records::Memory(_)) => {
            let mut kept = record.clone();
            kept.payload = sub.invoke.encode(published.as_ref())?;
            Some(kept)
        }
        _ => None,
    };
    engine.records.add_dead_letter(dead_letter, kept).await?;
    sub.metrics.dead_letters.increment(1);
    Counters::add(&sub.counters.dead_lettered, 1);
    Counters::add(&engine.counters.dead_lettered, 1);
    Ok(())
}
