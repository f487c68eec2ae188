//! The event bus, transient and durable: delivery, order, priorities, retries with backoff,
//! dead letters, the bounded queue, stop, statistics.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventfold::prelude::*;
use eventfold::{Delivery, Error, EventBus, NewEvent, Outgoing, RetryPolicy, TryPublishError};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Order")]
enum OrderEvent {
    Placed {
        #[domain_event(aggregate_id)]
        order: String,
        seq: u64,
    },
    Cancelled {
        #[domain_event(aggregate_id)]
        order: String,
    },
}

fn placed(order: &str, seq: u64) -> OrderEvent {
    OrderEvent::Placed {
        order: order.into(),
        seq,
    }
}

fn seq_of(event: &OrderEvent) -> u64 {
    match event {
        OrderEvent::Placed { seq, .. } => *seq,
        OrderEvent::Cancelled { .. } => u64::MAX,
    }
}

type Log<T> = Arc<Mutex<Vec<T>>>;

fn log<T>() -> Log<T> {
    Arc::new(Mutex::new(Vec::new()))
}

/// A handler that appends `(tag, order, seq)` of every delivery to `log`.
fn recorder(
    tag: &'static str,
    log: &Log<(&'static str, String, u64)>,
) -> impl Fn(Delivery<OrderEvent>) -> std::future::Ready<Result<(), Error>> + Send + Sync + 'static
{
    let log = Arc::clone(log);
    move |d: Delivery<OrderEvent>| {
        let order = d.record().aggregate_id.clone();
        log.lock().unwrap().push((tag, order, seq_of(d.event())));
        std::future::ready(Ok(()))
    }
}

fn transient(workers: usize) -> EventBus {
    EventBus::builder()
        .workers(workers)
        .jitter_seed(7)
        .build()
        .unwrap()
}

#[tokio::test]
async fn publish_and_subscribe() {
    let bus = transient(2);
    let seen = log();
    bus.subscribe("audit", recorder("audit", &seen))
        .register()
        .unwrap();
    bus.start().await.unwrap();
    bus.publish(placed("o-1", 1)).await.unwrap();
    bus.wait_idle().await.unwrap();
    assert_eq!(*seen.lock().unwrap(), [("audit", "o-1".to_string(), 1)]);
    bus.stop().await.unwrap();
}

#[tokio::test]
async fn a_batch_of_five_arrives_in_order() {
    let bus = transient(4);
    let seen = log();
    bus.subscribe("audit", recorder("audit", &seen))
        .register()
        .unwrap();
    bus.start().await.unwrap();
    let range = bus
        .publish_batch((1..=5).map(|i| placed("o-1", i)))
        .await
        .unwrap();
    assert_eq!(range, 1..=5);
    bus.wait_idle().await.unwrap();
    let seqs: Vec<u64> = seen.lock().unwrap().iter().map(|e| e.2).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn lower_priority_numbers_run_first() {
    let bus = transient(4);
    let seen = log();
    bus.subscribe("last", recorder("last", &seen))
        .priority(10)
        .register()
        .unwrap();
    bus.subscribe("first", recorder("first", &seen))
        .priority(-1)
        .register()
        .unwrap();
    bus.subscribe("middle", recorder("middle", &seen))
        .priority(5)
        .register()
        .unwrap();
    bus.start().await.unwrap();
    for i in 1..=3 {
        bus.publish(placed("o-1", i)).await.unwrap();
    }
    bus.wait_idle().await.unwrap();
    let tags: Vec<&str> = seen.lock().unwrap().iter().map(|e| e.0).collect();
    assert_eq!(
        tags,
        [
            "first", "middle", "last", "first", "middle", "last", "first", "middle", "last"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_handler_is_retried_and_does_not_disturb_another() {
    let bus = transient(2);
    let seen = log();
    bus.subscribe("steady", recorder("steady", &seen))
        .register()
        .unwrap();
    let attempts = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&attempts);
    bus.subscribe("flaky", move |_: Delivery<OrderEvent>| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            if n == 1 {
                Err("first attempt fails".into())
            } else {
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            }
        }
    })
    .retry(RetryPolicy::exponential(
        3,
        Duration::from_millis(100),
        Duration::from_secs(1),
    ))
    .register()
    .unwrap();
    bus.start().await.unwrap();
    bus.publish(placed("o-1", 1)).await.unwrap();
    bus.wait_idle().await.unwrap();

    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert_eq!(seen.lock().unwrap().len(), 1);
    let stats = bus.statistics().await.unwrap();
    assert_eq!((stats.delivered, stats.failed, stats.retried), (2, 1, 1));
    let flaky = stats
        .subscriptions
        .iter()
        .find(|s| s.name == "flaky")
        .unwrap();
    let steady = stats
        .subscriptions
        .iter()
        .find(|s| s.name == "steady")
        .unwrap();
    assert_eq!((flaky.delivered, flaky.failed, flaky.retried), (1, 1, 1));
    assert_eq!((steady.delivered, steady.failed), (1, 0));
    let failures = bus.failures("flaky", 10).await.unwrap();
    assert_eq!(failures.len(), 1);
    assert_eq!(
        (failures[0].attempt, failures[0].error.as_str()),
        (1, "first attempt fails")
    );
}

#[tokio::test]
async fn statistics_after_three_publishes() {
    let bus = transient(2);
    let seen = log();
    bus.subscribe("audit", recorder("audit", &seen))
        .register()
        .unwrap();
    bus.start().await.unwrap();
    for i in 1..=3 {
        bus.publish(placed(&format!("o-{i}"), i)).await.unwrap();
    }
    bus.wait_idle().await.unwrap();
    let stats = bus.statistics().await.unwrap();
    assert_eq!((stats.published, stats.delivered, stats.failed), (3, 3, 0));
    assert_eq!(
        (stats.retried, stats.dead_lettered, stats.queue_depth),
        (0, 0, 0)
    );
    assert_eq!(stats.queue_capacity, 10_000);
    assert_eq!(stats.subscriptions.len(), 1);
    assert_eq!(stats.subscriptions[0].delivered, 3);
    assert_eq!(stats.subscriptions[0].lag, 0);
    let json = serde_json::to_value(&stats).unwrap();
    assert_eq!(json["published"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_aggregate_is_delivered_in_order_under_four_workers() {
    const AGGREGATES: u64 = 1_000;
    const EVENTS: u64 = 50;
    let bus = transient(4);
    let seen: Arc<Mutex<HashMap<String, Vec<u64>>>> = Arc::default();
    let by_order = Arc::clone(&seen);
    bus.subscribe("orders", move |d: Delivery<OrderEvent>| {
        by_order
            .lock()
            .unwrap()
            .entry(d.record().aggregate_id.clone())
            .or_default()
            .push(seq_of(d.event()));
        std::future::ready(Ok::<_, Error>(()))
    })
    .register()
    .unwrap();
    bus.start().await.unwrap();
    for seq in 0..EVENTS {
        let batch: Vec<_> = (0..AGGREGATES)
            .map(|a| placed(&format!("o-{a}"), seq))
            .collect();
        bus.publish_batch(batch).await.unwrap();
    }
    bus.wait_idle().await.unwrap();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(seen.len() as u64, AGGREGATES);
    for (order, seqs) in seen.iter() {
        assert_eq!(
            *seqs,
            (0..EVENTS).collect::<Vec<_>>(),
            "{order} out of order"
        );
    }
    let stats = bus.statistics().await.unwrap();
    assert_eq!(stats.delivered, AGGREGATES * EVENTS);
    assert_eq!((stats.failed, stats.dead_lettered), (0, 0));
}

/// A handler that fails its first `fail` attempts at every event, recording when each
/// attempt started (tokio's paused clock) and which event it was.
fn failing(
    fail: u32,
    attempts: &Log<(Instant, u64, u32)>,
) -> impl Fn(Delivery<OrderEvent>) -> std::future::Ready<Result<(), String>> + Send + Sync + 'static
{
    let attempts = Arc::clone(attempts);
    move |d: Delivery<OrderEvent>| {
        attempts
            .lock()
            .unwrap()
            .push((Instant::now(), seq_of(d.event()), d.attempt()));
        std::future::ready(if d.attempt() <= fail {
            Err(format!("attempt {} failed", d.attempt()))
        } else {
            Ok(())
        })
    }
}

#[tokio::test(start_paused = true)]
async fn backoff_doubles_between_attempts() {
    let bus = transient(1);
    let attempts = log();
    bus.subscribe("mailer", failing(3, &attempts))
        .retry(
            RetryPolicy::exponential(5, Duration::from_millis(100), Duration::from_secs(10))
                .without_jitter(),
        )
        .register()
        .unwrap();
    bus.start().await.unwrap();
    bus.publish(placed("o-1", 1)).await.unwrap();
    bus.wait_idle().await.unwrap();
    let attempts = attempts.lock().unwrap();
    let gaps: Vec<u128> = attempts
        .windows(2)
        .map(|w| (w[1].0 - w[0].0).as_millis())
        .collect();
    assert_eq!(gaps, [100, 200, 400]);
    assert_eq!(attempts.last().unwrap().2, 4);
}

#[tokio::test(start_paused = true)]
async fn jittered_backoff_stays_between_half_and_the_full_delay() {
    let bus = transient(1);
    let attempts = log();
    bus.subscribe("mailer", failing(4, &attempts))
        .retry(RetryPolicy::exponential(
            5,
            Duration::from_millis(100),
            Duration::from_secs(10),
        ))
        .register()
        .unwrap();
    bus.start().await.unwrap();
    bus.publish(placed("o-1", 1)).await.unwrap();
    bus.wait_idle().await.unwrap();
    let attempts = attempts.lock().unwrap();
    for (i, w) in attempts.windows(2).enumerate() {
        let gap = w[1].0 - w[0].0;
        let nominal = Duration::from_millis(100 << i);
        assert!(gap >= nominal / 2 && gap <= nominal, "gap {i}: {gap:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn later_events_of_an_aggregate_wait_behind_a_retry_others_do_not() {
    let bus = transient(1);
    let attempts = log();
    let fail_first_of_a = {
        let attempts = Arc::clone(&attempts);
        move |d: Delivery<OrderEvent>| {
            let seq = seq_of(d.event());
            attempts
                .lock()
                .unwrap()
                .push((d.record().aggregate_id.clone(), seq, d.attempt()));
            let fail = d.record().aggregate_id == "a" && seq == 1 && d.attempt() < 3;
            std::future::ready(if fail { Err("not yet") } else { Ok(()) })
        }
    };
    bus.subscribe("projection", fail_first_of_a)
        .retry(RetryPolicy::exponential(
            5,
            Duration::from_secs(1),
            Duration::from_secs(5),
        ))
        .register()
        .unwrap();
    bus.start().await.unwrap();
    bus.publish_batch([
        placed("a", 1),
        placed("a", 2),
        placed("b", 1),
        placed("b", 2),
    ])
    .await
    .unwrap();
    bus.wait_idle().await.unwrap();
    let attempts = attempts.lock().unwrap();
    let of = |order: &str| -> Vec<(u64, u32)> {
        attempts
            .iter()
            .filter(|a| a.0 == order)
            .map(|a| (a.1, a.2))
            .collect()
    };
    assert_eq!(of("a"), [(1, 1), (1, 2), (1, 3), (2, 1)]);
    assert_eq!(of("b"), [(1, 1), (2, 1)]);
    // b went on while a waited: both of b's events came before a's second attempt.
    let second_a = attempts
        .iter()
        .position(|x| x.0 == "a" && x.2 == 2)
        .unwrap();
    let last_b = attempts.iter().rposition(|x| x.0 == "b").unwrap();
    assert!(last_b < second_a, "{attempts:?}");
}

#[tokio::test(start_paused = true)]
async fn after_the_last_attempt_the_event_is_dead_lettered_and_the_subscription_goes_on() {
    let bus = transient(1);
    let attempts = log();
    let always_fails_on_1 = {
        let attempts = Arc::clone(&attempts);
        move |d: Delivery<OrderEvent>| {
            attempts
                .lock()
                .unwrap()
                .push((seq_of(d.event()), d.attempt()));
            std::future::ready(if seq_of(d.event()) == 1 {
                Err("broken")
            } else {
                Ok(())
            })
        }
    };
    bus.subscribe("mailer", always_fails_on_1)
        .retry(RetryPolicy::exponential(
            3,
            Duration::from_millis(10),
            Duration::from_secs(1),
        ))
        .register()
        .unwrap();
    bus.start().await.unwrap();
    bus.publish_batch([placed("o", 1), placed("o", 2)])
        .await
        .unwrap();
    bus.wait_idle().await.unwrap();
    assert_eq!(*attempts.lock().unwrap(), [(1, 1), (1, 2), (1, 3), (2, 1)]);

    let dead = bus.dead_letters(Some("mailer")).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].attempts, dead[0].error.as_str()), (3, "broken"));
    assert!(dead[0].first_failed_at <= dead[0].last_failed_at);
    let stats = bus.statistics().await.unwrap();
    assert_eq!(
        (stats.failed, stats.retried, stats.dead_lettered),
        (3, 2, 1)
    );
    assert_eq!(stats.delivered, 1);
    assert_eq!(bus.failures("mailer", 10).await.unwrap().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_dead_letter_can_be_replayed_or_discarded() {
    let bus = transient(1);
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let delivered = log();
    let handler = {
        let healthy = Arc::clone(&healthy);
        let delivered = Arc::clone(&delivered);
        move |d: Delivery<OrderEvent>| {
            let ok = healthy.load(Ordering::SeqCst);
            if ok {
                delivered
                    .lock()
                    .unwrap()
                    .push((seq_of(d.event()), d.attempt()));
            }
            std::future::ready(if ok { Ok(()) } else { Err("down") })
        }
    };
    bus.subscribe("mailer", handler)
        .retry(RetryPolicy::never())
        .register()
        .unwrap();
    bus.start().await.unwrap();
    bus.publish_batch([placed("o", 1), placed("o", 2)])
        .await
        .unwrap();
    bus.wait_idle().await.unwrap();
    let dead = bus.dead_letters(None).await.unwrap();
    assert_eq!(dead.len(), 2);

    // Still down: replay fails, says why, and keeps the dead letter.
    match bus.replay_dead_letter(dead[0].id).await {
        Err(Error::HandlerFailed {
            subscription,
            message,
            ..
        }) => {
            assert_eq!(
                (subscription.as_str(), message.as_str()),
                ("mailer", "down")
            );
        }
        other => panic!("expected HandlerFailed, got {other:?}"),
    }
    assert_eq!(bus.dead_letters(None).await.unwrap().len(), 2);

    healthy.store(true, Ordering::SeqCst);
    bus.replay_dead_letter(dead[0].id).await.unwrap();
    assert_eq!(*delivered.lock().unwrap(), [(1, 2)]);
    bus.discard_dead_letter(dead[1].id).await.unwrap();
    assert!(bus.dead_letters(None).await.unwrap().is_empty());
    assert!(matches!(
        bus.discard_dead_letter(dead[1].id).await,
        Err(Error::DeadLetterNotFound { .. })
    ));
    assert!(matches!(
        bus.replay_dead_letter(dead[1].id).await,
        Err(Error::DeadLetterNotFound { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn a_panicking_handler_is_a_failed_attempt_and_the_worker_survives() {
    let bus = transient(1);
    let seen = log();
    let panics_on_1 = {
        let seen = Arc::clone(&seen);
        move |d: Delivery<OrderEvent>| {
            let seq = seq_of(d.event());
            let seen = Arc::clone(&seen);
            async move {
                if seq == 1 {
                    panic!("handler bug");
                }
                seen.lock().unwrap().push(seq);
                Ok::<_, Error>(())
            }
        }
    };
    bus.subscribe("fragile", panics_on_1)
        .retry(RetryPolicy::exponential(
            2,
            Duration::from_millis(5),
            Duration::from_millis(5),
        ))
        .register()
        .unwrap();
    bus.start().await.unwrap();
    bus.publish_batch([placed("o", 1), placed("o", 2)])
        .await
        .unwrap();
    bus.wait_idle().await.unwrap();
    assert_eq!(*seen.lock().unwrap(), [2]);
    let dead = bus.dead_letters(None).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].error.contains("handler bug"), "{}", dead[0].error);
    assert_eq!(dead[0].attempts, 2);
}

#[tokio::test]
async fn blocking_handlers_run_off_the_workers() {
    let bus = transient(1);
    let seen = log();
    let blocking = {
        let seen = Arc::clone(&seen);
        move |d: Delivery<OrderEvent>| {
            // Real blocking work: a synchronous file-system call.
            std::fs::metadata(std::env::current_exe()?)?;
            seen.lock().unwrap().push(seq_of(d.event()));
            Ok::<_, std::io::Error>(())
        }
    };
    bus.subscribe_blocking("files", blocking)
        .register()
        .unwrap();
    bus.start().await.unwrap();
    bus.publish_batch((1..=3).map(|i| placed("o", i)))
        .await
        .unwrap();
    bus.wait_idle().await.unwrap();
    assert_eq!(*seen.lock().unwrap(), [1, 2, 3]);
}

#[tokio::test]
async fn unsubscribed_handlers_get_nothing_more() {
    let bus = transient(1);
    let seen = log();
    let handle = bus
        .subscribe("audit", recorder("audit", &seen))
        .register()
        .unwrap();
    assert_eq!(handle.id(), "audit");
    assert!(matches!(
        bus.subscribe("audit", recorder("audit", &seen)).register(),
        Err(Error::DuplicateSubscription { .. })
    ));
    bus.start().await.unwrap();
    bus.publish(placed("o", 1)).await.unwrap();
    bus.wait_idle().await.unwrap();
    assert!(bus.unsubscribe(handle.id()));
    assert!(!bus.unsubscribe(handle.id()));
    bus.publish(placed("o", 2)).await.unwrap();
    bus.wait_idle().await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn stop_drains_queued_events_then_refuses_more() {
    let bus = transient(2);
    let seen = log();
    bus.subscribe("audit", recorder("audit", &seen))
        .register()
        .unwrap();
    bus.start().await.unwrap();
    bus.publish_batch((1..=100).map(|i| placed(&format!("o-{}", i % 7), i)))
        .await
        .unwrap();
    let report = bus.stop().await.unwrap();
    assert!(report.drained);
    assert_eq!(report.unfinished, 0);
    assert_eq!(seen.lock().unwrap().len(), 100);
    assert!(matches!(
        bus.publish(placed("o", 1)).await,
        Err(Error::BusStopped)
    ));
    assert!(matches!(bus.start().await, Err(Error::BusStopped)));
    assert!(matches!(bus.wait_idle().await, Err(Error::BusNotRunning)));
}

#[tokio::test(start_paused = true)]
async fn stop_gives_up_on_retries_after_its_timeout() {
    let bus = EventBus::builder()
        .workers(1)
        .stop_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let attempts = log();
    bus.subscribe("mailer", failing(u32::MAX, &attempts))
        .retry(RetryPolicy::exponential(
            10,
            Duration::from_secs(60),
            Duration::from_secs(60),
        ))
        .register()
        .unwrap();
    bus.start().await.unwrap();
    bus.publish(placed("o", 1)).await.unwrap();
    let report = bus.stop().await.unwrap();
    assert!(!report.drained);
    assert_eq!(report.unfinished, 1);
}

#[tokio::test]
async fn a_full_queue_refuses_try_publish_and_whole_batches() {
    let bus = EventBus::builder().queue_capacity(3).build().unwrap();
    bus.subscribe("audit", recorder("audit", &log()))
        .register()
        .unwrap();
    // Not started: nothing drains the queue.
    bus.try_publish(placed("o", 1)).await.unwrap();
    bus.publish_batch([placed("o", 2), placed("o", 3)])
        .await
        .unwrap();
    match bus.try_publish(placed("o", 4)).await {
        Err(TryPublishError::Full(event)) => assert_eq!(event.into_event(), placed("o", 4)),
        other => panic!("expected a full queue, got {other:?}"),
    }
    assert!(matches!(
        bus.publish_batch((0..4).map(|i| placed("o", i))).await,
        Err(Error::QueueFull { capacity: 3 })
    ));
    let stats = bus.statistics().await.unwrap();
    assert_eq!((stats.published, stats.queue_depth), (3, 3));

    // A waiting publish goes through once the queue drains.
    let waiting = tokio::spawn({
        let bus = bus.clone();
        async move { bus.publish(placed("o", 5)).await }
    });
    bus.start().await.unwrap();
    waiting.await.unwrap().unwrap();
    bus.wait_idle().await.unwrap();
    assert_eq!(bus.statistics().await.unwrap().delivered, 4);
}

/// Handlers that publish into their own full bus do not deadlock it: every slot is held by
/// an event whose handler publishes, so those publishes go beyond the capacity instead of
/// waiting for a slot that would never come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_publishing_into_their_own_full_queue_do_not_deadlock_it() {
    let bus = EventBus::builder()
        .queue_capacity(8)
        .workers(2)
        .build()
        .unwrap();
    let cancelled = Arc::new(AtomicU32::new(0));
    let relay = bus.clone();
    bus.subscribe("relay", move |d: Delivery<OrderEvent>| {
        let relay = relay.clone();
        async move {
            if let OrderEvent::Placed { order, .. } = d.event() {
                relay
                    .publish(OrderEvent::Cancelled {
                        order: order.clone(),
                    })
                    .await?;
            }
            Ok::<_, Error>(())
        }
    })
    .retry(RetryPolicy::never())
    .register()
    .unwrap();
    let seen = Arc::clone(&cancelled);
    bus.subscribe("count", move |d: Delivery<OrderEvent>| {
        if matches!(d.event(), OrderEvent::Cancelled { .. }) {
            seen.fetch_add(1, Ordering::SeqCst);
        }
        std::future::ready(Ok::<_, Error>(()))
    })
    .register()
    .unwrap();
    bus.start().await.unwrap();
    // A deadlock would hang here: fail instead (a guard, not a measurement).
    let run = async {
        for i in 0..200 {
            bus.publish(placed(&format!("o-{}", i % 10), i))
                .await
                .unwrap();
        }
        bus.wait_idle().await.unwrap();
    };
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the bus deadlocked");
    assert_eq!(cancelled.load(Ordering::SeqCst), 200);
    let stats = bus.statistics().await.unwrap();
    assert_eq!((stats.published, stats.queue_depth), (400, 0));
    assert_eq!((stats.failed, stats.dead_lettered), (0, 0));
}

#[tokio::test]
async fn events_need_an_aggregate_id() {
    #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
    #[domain_event(aggregate = "Clock", name = "Ticked")]
    struct Ticked {
        n: u64,
    }
    let bus = transient(1);
    bus.start().await.unwrap();
    assert!(matches!(
        bus.publish(Ticked { n: 1 }).await,
        Err(Error::MissingAggregateId { event_type }) if event_type == "Ticked"
    ));
    bus.publish(Outgoing::new(Ticked { n: 1 }).to("clock-1"))
        .await
        .unwrap();
}

// ----- With a store: durable subscriptions -----

fn durable(store: &InMemoryEventStore) -> EventBus {
    EventBus::builder()
        .store(Arc::new(store.clone()))
        .workers(2)
        .jitter_seed(7)
        .build()
        .unwrap()
}

#[tokio::test]
async fn with_a_store_publish_appends_and_subscribers_read_the_log() {
    let store = InMemoryEventStore::new();
    let bus = durable(&store);
    let seen = log();
    bus.subscribe("audit", recorder("audit", &seen))
        .register()
        .unwrap();
    bus.start().await.unwrap();
    let position = bus
        .publish(Outgoing::new(placed("o-1", 1)).metadata(Metadata::new().with("user", "ada")))
        .await
        .unwrap();
    assert_eq!(position, 1);
    let range = bus
        .publish_batch([placed("o-1", 2), placed("o-2", 1), placed("o-1", 3)])
        .await
        .unwrap();
    assert_eq!(range, 2..=4);
    bus.wait_idle().await.unwrap();

    let stored = store.read_all(1, 10).await.unwrap();
    assert_eq!(stored.len(), 4);
    assert_eq!(stored[0].metadata.values["user"], "ada");
    let o1: Vec<u64> = store
        .read_stream(&StreamId::new("Order", "o-1"), 1)
        .await
        .unwrap()
        .iter()
        .map(|e| e.version)
        .collect();
    assert_eq!(o1, [1, 2, 3]);
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(seen.len(), 4);
    let o1_seqs: Vec<u64> = seen.iter().filter(|e| e.1 == "o-1").map(|e| e.2).collect();
    assert_eq!(o1_seqs, [1, 2, 3]);
    bus.stop().await.unwrap();
    assert_eq!(store.load_checkpoint("audit").await.unwrap(), Some(4));
}

#[tokio::test]
async fn events_appended_by_a_repository_reach_subscribers_without_a_publish() {
    use common as account;
    let store = InMemoryEventStore::new();
    let bus = durable(&store);
    let seen: Log<String> = log();
    let recorded = Arc::clone(&seen);
    bus.subscribe("ledger", move |d: Delivery<account::AccountEvent>| {
        recorded
            .lock()
            .unwrap()
            .push(d.record().event_type.to_string());
        std::future::ready(Ok::<_, Error>(()))
    })
    .register()
    .unwrap();
    bus.start().await.unwrap();
    let repo = Repository::<account::Account>::new(Arc::new(store.clone()));
    repo.execute(
        "a",
        account::AccountCommand::Open {
            owner: "Ada".into(),
        },
    )
    .await
    .unwrap();
    repo.execute("a", account::AccountCommand::Deposit(5))
        .await
        .unwrap();
    bus.wait_idle().await.unwrap();
    assert_eq!(*seen.lock().unwrap(), ["Opened", "FundsDeposited"]);
}

#[tokio::test]
async fn a_restarted_bus_resumes_from_the_checkpoints() {
    let store = InMemoryEventStore::new();
    let first = durable(&store);
    let seen = log();
    first
        .subscribe("audit", recorder("first", &seen))
        .register()
        .unwrap();
    first.start().await.unwrap();
    first
        .publish_batch((1..=3).map(|i| placed("o", i)))
        .await
        .unwrap();
    first.wait_idle().await.unwrap();
    first.stop().await.unwrap();

    // Stored while no bus runs: the next bus catches up on them, and only them.
    for i in 4..=5 {
        let event = NewEvent::from_event(&placed("o", i), Metadata::new()).unwrap();
        store
            .append(
                &StreamId::new("Order", "o"),
                ExpectedVersion::Any,
                vec![event],
            )
            .await
            .unwrap();
    }
    let second = durable(&store);
    second
        .subscribe("audit", recorder("second", &seen))
        .register()
        .unwrap();
    second.start().await.unwrap();
    second.wait_idle().await.unwrap();
    let seen = seen.lock().unwrap();
    let by = |tag| -> Vec<u64> { seen.iter().filter(|e| e.0 == tag).map(|e| e.2).collect() };
    assert_eq!(by("first"), [1, 2, 3]);
    assert_eq!(by("second"), [4, 5]);
}

#[tokio::test]
async fn a_late_subscription_catches_up_from_the_start_without_repeating_others() {
    let store = InMemoryEventStore::new();
    let bus = durable(&store);
    let seen = log();
    bus.subscribe("early", recorder("early", &seen))
        .register()
        .unwrap();
    bus.start().await.unwrap();
    bus.publish_batch((1..=4).map(|i| placed("o", i)))
        .await
        .unwrap();
    bus.wait_idle().await.unwrap();
    bus.subscribe("late", recorder("late", &seen))
        .register()
        .unwrap();
    bus.publish(placed("o", 5)).await.unwrap();
    bus.wait_idle().await.unwrap();
    let seen = seen.lock().unwrap();
    let by = |tag| -> Vec<u64> { seen.iter().filter(|e| e.0 == tag).map(|e| e.2).collect() };
    assert_eq!(by("early"), [1, 2, 3, 4, 5]);
    assert_eq!(by("late"), [1, 2, 3, 4, 5]);
}

#[tokio::test(start_paused = true)]
async fn an_undecodable_stored_event_is_dead_lettered_at_once() {
    let store = InMemoryEventStore::new();
    let mut corrupt = NewEvent::from_event(&placed("o", 1), Metadata::new()).unwrap();
    corrupt.payload = r#"{"order":"o","seq":"one"}"#.into();
    let corrupt_id = corrupt.event_id;
    let good = NewEvent::from_event(&placed("o", 2), Metadata::new()).unwrap();
    store
        .append(
            &StreamId::new("Order", "o"),
            ExpectedVersion::Any,
            vec![corrupt, good],
        )
        .await
        .unwrap();
    let bus = durable(&store);
    let seen = log();
    bus.subscribe("audit", recorder("audit", &seen))
        .register()
        .unwrap();
    bus.start().await.unwrap();
    bus.wait_idle().await.unwrap();
    assert_eq!(*seen.lock().unwrap(), [("audit", "o".to_string(), 2)]);
    let dead = bus.dead_letters(None).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].event_id, dead[0].position, dead[0].attempts),
        (corrupt_id, 1, 1)
    );
    assert!(
        dead[0].error.contains("does not decode"),
        "{}",
        dead[0].error
    );
    // The dead letter lives in the store, beside the untouched event.
    assert_eq!(store.dead_letters(None).await.unwrap().len(), 1);
    assert_eq!(
        store.get(corrupt_id).await.unwrap().unwrap().payload,
        r#"{"order":"o","seq":"one"}"#
    );
    bus.stop().await.unwrap();
    assert_eq!(store.load_checkpoint("audit").await.unwrap(), Some(2));
}

#[tokio::test]
async fn a_durable_bus_keeps_only_a_window_of_events_in_memory() {
    let store = InMemoryEventStore::new();
    let bus = EventBus::builder()
        .store(Arc::new(store.clone()))
        .queue_capacity(10)
        .batch_size(4)
        .build()
        .unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let handler = {
        let gate = Arc::clone(&gate);
        move |_: Delivery<OrderEvent>| {
            let gate = Arc::clone(&gate);
            async move {
                gate.acquire().await.unwrap().forget();
                Ok::<_, Error>(())
            }
        }
    };
    bus.subscribe("slow", handler).register().unwrap();
    bus.publish_batch((0..100).map(|i| placed(&format!("o-{i}"), i)))
        .await
        .unwrap();
    bus.start().await.unwrap();
    // The handlers are blocked: the engine reads until its window is full, and no further.
    while bus.statistics().await.unwrap().in_flight < 10 {
        tokio::task::yield_now().await;
    }
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    let stats = bus.statistics().await.unwrap();
    assert_eq!(
        stats.in_flight, 10,
        "at most the capacity is held in memory"
    );
    assert_eq!(stats.queue_depth, 100, "the backlog stays in the log");
    gate.add_permits(100);
    bus.wait_idle().await.unwrap();
    assert_eq!(bus.statistics().await.unwrap().delivered, 100);
}

/// A handler that awaits: the deliveries of its aggregate behind it stay in memory while
/// more than half the queue is free (keeping their slots), and leave it beyond that to be
/// read again from the store; either way they come in order, and the other aggregates get
/// the rest of the room meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_behind_an_awaiting_handler_keep_their_order_in_memory_and_out_of_it() {
    let store = InMemoryEventStore::new();
    let bus = EventBus::builder()
        .store(Arc::new(store.clone()))
        .queue_capacity(8)
        .batch_size(4)
        .build()
        .unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let seen: Log<(String, u64)> = log();
    let handler = {
        let (gate, seen) = (Arc::clone(&gate), Arc::clone(&seen));
        move |d: Delivery<OrderEvent>| {
            let (gate, seen) = (Arc::clone(&gate), Arc::clone(&seen));
            let order = d.record().aggregate_id.clone();
            let seq = seq_of(d.event());
            async move {
                if order == "slow" && seq == 1 {
                    gate.acquire().await.unwrap().forget();
                }
                seen.lock().unwrap().push((order, seq));
                Ok::<_, Error>(())
            }
        }
    };
    bus.subscribe("projection", handler).register().unwrap();
    bus.publish_batch((1..=30).map(|i| placed("slow", i)))
        .await
        .unwrap();
    bus.publish_batch((1..=20).map(|i| placed(&format!("o-{}", i % 5), i)))
        .await
        .unwrap();
    bus.start().await.unwrap();
    // The other aggregates are delivered while the first event of `slow` waits.
    loop {
        let others = seen.lock().unwrap().len();
        if others == 20 {
            break;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let stats = bus.statistics().await.unwrap();
    assert!(
        stats.in_flight <= 4,
        "waiting deliveries hold at most half the room: {stats:?}"
    );
    gate.add_permits(1);
    bus.wait_idle().await.unwrap();
    let seen = seen.lock().unwrap().clone();
    let slow: Vec<u64> = seen
        .iter()
        .filter(|(order, _)| order == "slow")
        .map(|(_, seq)| *seq)
        .collect();
    assert_eq!(slow, (1..=30).collect::<Vec<_>>());
    for o in 0..5 {
        let order = format!("o-{o}");
        let seqs: Vec<u64> = seen
            .iter()
            .filter(|(id, _)| *id == order)
            .map(|(_, seq)| *seq)
            .collect();
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, sorted, "{order} in order");
        assert_eq!(seqs.len(), 4);
    }
    assert_eq!(store.load_checkpoint("projection").await.unwrap(), Some(50));
    bus.stop().await.unwrap();
}

/// Regression: `wait_idle` right after a subscription joined a running, idle bus returned
/// before the dispatcher had even seen the new subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_idle_after_a_subscribe_waits_for_its_catch_up() {
    for _ in 0..20 {
        let store = InMemoryEventStore::new();
        for i in 1..=3 {
            let event = NewEvent::from_event(&placed("o", i), Metadata::new()).unwrap();
            store
                .append(
                    &StreamId::new("Order", "o"),
                    ExpectedVersion::Any,
                    vec![event],
                )
                .await
                .unwrap();
        }
        let bus = durable(&store);
        bus.start().await.unwrap();
        bus.wait_idle().await.unwrap();
        let seen = log();
        bus.subscribe("late", recorder("late", &seen))
            .register()
            .unwrap();
        bus.wait_idle().await.unwrap();
        assert_eq!(seen.lock().unwrap().len(), 3);
        bus.stop().await.unwrap();
    }
}

#[tokio::test]
async fn a_publisher_waiting_for_room_is_told_when_the_bus_stops() {
    let bus = EventBus::builder().queue_capacity(1).build().unwrap();
    bus.subscribe("audit", recorder("audit", &log()))
        .register()
        .unwrap();
    bus.publish(placed("o", 1)).await.unwrap();
    let waiting = tokio::spawn({
        let bus = bus.clone();
        async move { bus.publish(placed("o", 2)).await }
    });
    // The queue is full and nothing drains it: on this one-thread runtime the publisher
    // runs as soon as the test yields, and waits for room until the stop.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(!waiting.is_finished(), "the publisher waits for room");
    bus.stop().await.unwrap();
    assert!(matches!(waiting.await.unwrap(), Err(Error::BusStopped)));
}

/// Counts drops of the events of `handled_events_are_all_dropped_by_the_time_the_bus_stops`.
static DROPPED: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, Default)]
struct DropCounter;

impl Drop for DropCounter {
    fn drop(&mut self) {
        DROPPED.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Meter", name = "MeterRead")]
struct MeterRead {
    #[domain_event(aggregate_id)]
    meter: String,
    #[serde(skip)]
    _counter: DropCounter,
}

/// Workers hand finished events back for a publisher to drop; none is kept past `stop`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handled_events_are_all_dropped_by_the_time_the_bus_stops() {
    let bus = transient(2);
    bus.subscribe("reader", |_: Delivery<MeterRead>| {
        std::future::ready(Ok::<_, Error>(()))
    })
    .register()
    .unwrap();
    bus.start().await.unwrap();
    for i in 0..1_000 {
        let event = MeterRead {
            meter: format!("m-{}", i % 7),
            _counter: DropCounter,
        };
        bus.publish(event).await.unwrap();
    }
    bus.wait_idle().await.unwrap();
    bus.stop().await.unwrap();
    assert_eq!(DROPPED.load(Ordering::SeqCst), 1_000);
}

// ----- Small typed errors, handlers without annotations -----

/// Regression: `try_publish` consumed the event when the queue was full or the bus stopped,
/// so the caller could not publish it again; every refusal now gives it back, with its
/// aggregate id and metadata.
#[tokio::test]
async fn try_publish_gives_the_event_back_when_full_stopped_or_failed() {
    let bus = EventBus::builder().queue_capacity(1).build().unwrap();
    bus.try_publish(placed("o", 1)).await.unwrap();
    let given = Outgoing::new(placed("o", 2))
        .to("elsewhere")
        .metadata(Metadata::default().with("k", "v"));
    let full = bus.try_publish(given).await.unwrap_err();
    assert!(matches!(full, TryPublishError::Full(_)), "{full:?}");
    assert_eq!(full.to_string(), "the bus queue is full");
    let back = full.into_inner();
    assert_eq!(back.event(), &placed("o", 2));

    // Published again as it came back: to the aggregate it named, with its metadata.
    let log = log();
    let seen = Arc::clone(&log);
    bus.subscribe::<OrderEvent, _>("audit", move |d| {
        let seen = Arc::clone(&seen);
        async move {
            seen.lock().unwrap().push((
                d.record().aggregate_id.clone(),
                d.record().metadata.values.get("k").cloned(),
            ));
        }
    })
    .register()
    .unwrap();
    bus.start().await.unwrap();
    bus.publish(back).await.unwrap();
    bus.wait_idle().await.unwrap();
    assert_eq!(
        log.lock().unwrap()[1],
        ("elsewhere".to_owned(), Some("v".to_owned()))
    );

    // Not about room: the error says why, and the event still comes back.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
    #[domain_event(aggregate = "Order", name = "OrderNoted")]
    struct Noted {
        text: String,
    }
    let failed = bus
        .try_publish(Noted { text: "t".into() })
        .await
        .unwrap_err();
    assert!(
        matches!(failed.error(), Some(Error::MissingAggregateId { .. })),
        "{failed:?}"
    );
    assert_eq!(failed.into_inner().into_event(), Noted { text: "t".into() });

    bus.stop().await.unwrap();
    let stopped = bus.try_publish(placed("o", 3)).await.unwrap_err();
    assert!(
        matches!(stopped, TryPublishError::Stopped(_)),
        "{stopped:?}"
    );
    assert_eq!(stopped.into_inner().into_event(), placed("o", 3));
}

/// Regression: a store's failure under `try_publish` consumed the event too.
#[tokio::test]
async fn try_publish_on_a_closed_store_gives_the_event_back_with_the_store_error() {
    let store = eventfold::SqliteEventStore::open_in_memory(Default::default())
        .await
        .unwrap();
    let bus = EventBus::builder()
        .store(Arc::new(store.clone()))
        .build()
        .unwrap();
    store.close().await.unwrap();
    let failed = bus.try_publish(placed("o", 1)).await.unwrap_err();
    assert_eq!(
        failed.error().and_then(Error::store_kind),
        Some(eventfold::StoreErrorKind::Closed),
        "{failed:?}"
    );
    assert_eq!(failed.into_inner().into_event(), placed("o", 1));
}

/// Regression: bad bus settings reported `InvalidAppend`, as if an append were malformed.
#[test]
fn bad_bus_settings_are_a_settings_error_naming_the_setting() {
    for (builder, name) in [
        (EventBus::builder().workers(0), "workers"),
        (EventBus::builder().queue_capacity(0), "queue_capacity"),
        (EventBus::builder().batch_size(0), "batch_size"),
    ] {
        match builder.build() {
            Err(Error::InvalidSetting { setting, .. }) => assert_eq!(setting, name),
            other => panic!("expected an invalid {name}, got {other:?}"),
        }
    }
}

/// Regression: an empty subscription name reported `UnknownSubscription`.
#[test]
fn an_empty_subscription_name_is_a_name_error_not_an_unknown_subscription() {
    let bus = transient(1);
    let refused = bus.subscribe::<OrderEvent, _>("", |_| async {}).register();
    assert!(
        matches!(refused, Err(Error::InvalidSubscriptionName { ref name, .. }) if name.is_empty()),
        "{refused:?}"
    );
}

#[derive(Debug, thiserror::Error)]
#[error("the mail server is down")]
struct MailDown;

/// Handlers as people write them: no annotation on the closure, and `()`, any error type
/// or none; the old annotated form still compiles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_need_no_annotations_and_return_unit_or_any_error() {
    let bus = transient(2);
    let count = Arc::new(AtomicU32::new(0));
    let c = Arc::clone(&count);
    bus.subscribe::<OrderEvent, _>("unit", move |_| {
        let c = Arc::clone(&c);
        async move {
            c.fetch_add(1, Ordering::SeqCst);
        }
    })
    .register()
    .unwrap();
    bus.subscribe::<OrderEvent, _>("own-error", |_| async { Err(MailDown) })
        .retry(RetryPolicy::never())
        .register()
        .unwrap();
    bus.subscribe::<OrderEvent, _>("io-error", |d| async move {
        if d.attempt() > 0 {
            return Err(std::io::Error::other("disk on fire"));
        }
        Ok(())
    })
    .retry(RetryPolicy::never())
    .register()
    .unwrap();
    bus.subscribe("annotated", |_: Delivery<OrderEvent>| async move {
        Ok::<_, std::convert::Infallible>(())
    })
    .register()
    .unwrap();
    let b = Arc::clone(&count);
    bus.subscribe_blocking::<OrderEvent, _>("blocking-unit", move |_| {
        b.fetch_add(1, Ordering::SeqCst);
    })
    .register()
    .unwrap();
    bus.subscribe_blocking::<OrderEvent, _>("blocking-error", |_| Err("no"))
        .retry(RetryPolicy::never())
        .register()
        .unwrap();
    bus.start().await.unwrap();
    bus.publish(placed("o", 1)).await.unwrap();
    bus.wait_idle().await.unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 2);
    let mut dead: Vec<(String, String)> = bus
        .dead_letters(None)
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.subscription, d.error))
        .collect();
    dead.sort();
    assert_eq!(
        dead,
        [
            ("blocking-error".to_owned(), "no".to_owned()),
            ("io-error".to_owned(), "disk on fire".to_owned()),
            ("own-error".to_owned(), "the mail server is down".to_owned()),
        ]
    );
    bus.stop().await.unwrap();
}
