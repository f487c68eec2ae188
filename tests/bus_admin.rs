//! Bulk operator operations on the bus's dead letters and failure records
//! (`discard_dead_letters`, `clear_failures`, `replay_dead_letters`), each on a bus without
//! a store and on one over a SQLite file.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use eventfold::prelude::*;
use eventfold::{
    Delivery, Error, EventBus, NewEvent, ReplayReport, RetryPolicy, SqliteEventStore, SqliteOptions,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Invoice")]
enum InvoiceEvent {
    Issued {
        #[domain_event(aggregate_id)]
        invoice: String,
        seq: u64,
    },
}

fn issued(invoice: &str, seq: u64) -> InvoiceEvent {
    InvoiceEvent::Issued {
        invoice: invoice.into(),
        seq,
    }
}

/// Which aggregates a handler fails for.
#[derive(Clone)]
enum Broken {
    All,
    Only(HashSet<String>),
    Nothing,
}

/// One attempt a handler saw.
struct Attempt {
    invoice: String,
    seq: u64,
    attempt: u32,
    succeeded: bool,
}

/// A subscription's handler state: what it fails for, and every attempt it saw.
#[derive(Clone)]
struct Gate {
    broken: Arc<Mutex<Broken>>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
}

impl Gate {
    fn new() -> Self {
        Gate {
            broken: Arc::new(Mutex::new(Broken::All)),
            attempts: Arc::default(),
        }
    }

    fn set(&self, broken: Broken) {
        *self.broken.lock().unwrap() = broken;
    }

    fn only(&self, aggregates: &[&str]) {
        self.set(Broken::Only(
            aggregates.iter().map(|a| a.to_string()).collect(),
        ));
    }

    /// The successful deliveries, as (aggregate, seq, attempt).
    fn delivered(&self) -> Vec<(String, u64, u32)> {
        self.attempts
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.succeeded)
            .map(|a| (a.invoice.clone(), a.seq, a.attempt))
            .collect()
    }

    fn tried(&self) -> usize {
        self.attempts.lock().unwrap().len()
    }

    fn handler(
        &self,
    ) -> impl Fn(Delivery<InvoiceEvent>) -> std::future::Ready<Result<(), String>> + Send + Sync + 'static
    {
        let gate = self.clone();
        move |d: Delivery<InvoiceEvent>| {
            let InvoiceEvent::Issued { invoice, seq } = d.event();
            let fails = match &*gate.broken.lock().unwrap() {
                Broken::All => true,
                Broken::Only(set) => set.contains(invoice),
                Broken::Nothing => false,
            };
            gate.attempts.lock().unwrap().push(Attempt {
                invoice: invoice.clone(),
                seq: *seq,
                attempt: d.attempt(),
                succeeded: !fails,
            });
            std::future::ready(if fails {
                Err(format!("{invoice} is broken"))
            } else {
                Ok(())
            })
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Transient,
    Sqlite,
}

const KINDS: [Kind; 2] = [Kind::Transient, Kind::Sqlite];

/// A bus of this kind with one subscription per gate (named as given, no retries),
/// started; the directory holds the SQLite file, if any.
async fn bus(kind: Kind, subs: &[(&str, &Gate)]) -> (EventBus, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("eventfold-bus-admin-")
        .tempdir()
        .unwrap();
    let builder = EventBus::builder().workers(2).jitter_seed(7);
    let builder = match kind {
        Kind::Transient => builder,
        Kind::Sqlite => builder.store(
            SqliteEventStore::open(dir.path().join("bus.db"), SqliteOptions::new())
                .await
                .unwrap(),
        ),
    };
    let bus = builder.build().unwrap();
    for (name, gate) in subs {
        bus.subscribe(*name, gate.handler())
            .retry(RetryPolicy::never())
            .register()
            .unwrap();
    }
    bus.start().await.unwrap();
    (bus, dir)
}

/// Publishes (aggregate, seq) one by one, in this order, and waits until all are handled.
async fn publish(bus: &EventBus, events: &[(&str, u64)]) {
    for (invoice, seq) in events {
        bus.publish(issued(invoice, *seq)).await.unwrap();
    }
    bus.wait_idle().await.unwrap();
}

async fn dead_count(bus: &EventBus, subscription: &str) -> usize {
    bus.dead_letters(Some(subscription)).await.unwrap().len()
}

fn report(replayed: u64, failed: u64, held_back: u64, no_subscription: u64) -> ReplayReport {
    let mut report = ReplayReport::default();
    report.replayed = replayed;
    report.failed = failed;
    report.held_back = held_back;
    report.no_subscription = no_subscription;
    report
}

fn is_unknown(result: Result<impl std::fmt::Debug, Error>, name: &str) -> bool {
    matches!(result, Err(Error::UnknownSubscription { name: n }) if n == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_discard_of_one_subscription_leaves_the_others() {
    for kind in KINDS {
        let (mailer, audit) = (Gate::new(), Gate::new());
        let (bus, _dir) = bus(kind, &[("mailer", &mailer), ("audit", &audit)]).await;
        publish(&bus, &[("i-1", 1), ("i-2", 1), ("i-1", 2)]).await;
        assert_eq!(bus.dead_letters(None).await.unwrap().len(), 6, "{kind:?}");

        assert_eq!(bus.discard_dead_letters(Some("mailer")).await.unwrap(), 3);
        assert_eq!(dead_count(&bus, "mailer").await, 0, "{kind:?}");
        assert_eq!(dead_count(&bus, "audit").await, 3, "{kind:?}");
        // Nothing was delivered by discarding.
        assert_eq!(mailer.tried(), 3, "{kind:?}");

        assert!(is_unknown(
            bus.discard_dead_letters(Some("mailr")).await,
            "mailr"
        ));
        assert_eq!(dead_count(&bus, "audit").await, 3, "{kind:?}");

        assert_eq!(bus.discard_dead_letters(None).await.unwrap(), 3);
        assert!(bus.dead_letters(None).await.unwrap().is_empty(), "{kind:?}");
        assert_eq!(bus.discard_dead_letters(None).await.unwrap(), 0);
        assert_eq!(bus.discard_dead_letters(Some("audit")).await.unwrap(), 0);

        // A discarded (subscription, event) is dead-lettered afresh when it fails again.
        publish(&bus, &[("i-3", 1)]).await;
        assert_eq!(dead_count(&bus, "mailer").await, 1, "{kind:?}");
        bus.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_failures_removes_one_subscriptions_records_or_all_and_keeps_dead_letters() {
    for kind in KINDS {
        let (mailer, audit) = (Gate::new(), Gate::new());
        let (bus, _dir) = bus(kind, &[("mailer", &mailer), ("audit", &audit)]).await;
        publish(&bus, &[("i-1", 1), ("i-2", 1), ("i-1", 2)]).await;
        assert_eq!(bus.failures("mailer", 100).await.unwrap().len(), 3);
        assert_eq!(bus.failures("audit", 100).await.unwrap().len(), 3);

        assert_eq!(bus.clear_failures(Some("mailer")).await.unwrap(), 3);
        assert!(
            bus.failures("mailer", 100).await.unwrap().is_empty(),
            "{kind:?}"
        );
        assert_eq!(
            bus.failures("audit", 100).await.unwrap().len(),
            3,
            "{kind:?}"
        );
        assert_eq!(bus.dead_letters(None).await.unwrap().len(), 6, "{kind:?}");

        assert!(is_unknown(
            bus.clear_failures(Some("nobody")).await,
            "nobody"
        ));
        assert_eq!(bus.clear_failures(None).await.unwrap(), 3);
        assert!(
            bus.failures("audit", 100).await.unwrap().is_empty(),
            "{kind:?}"
        );
        assert_eq!(bus.clear_failures(None).await.unwrap(), 0);
        assert_eq!(bus.dead_letters(None).await.unwrap().len(), 6, "{kind:?}");

        // Failures recorded after a clear are kept as before.
        publish(&bus, &[("i-3", 1)]).await;
        // The failure record is written beside the delivery; wait for it, not for time.
        while bus.failures("mailer", 100).await.unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        assert_eq!(bus.failures("mailer", 100).await.unwrap().len(), 1);
        bus.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_all_with_a_handler_that_now_succeeds_delivers_in_order_and_removes_all() {
    for kind in KINDS {
        let mailer = Gate::new();
        let (bus, _dir) = bus(kind, &[("mailer", &mailer)]).await;
        publish(&bus, &[("i-1", 1), ("i-2", 1), ("i-1", 2), ("i-1", 3)]).await;
        assert_eq!(dead_count(&bus, "mailer").await, 4, "{kind:?}");

        mailer.set(Broken::Nothing);
        assert_eq!(
            bus.replay_dead_letters(Some("mailer")).await.unwrap(),
            report(4, 0, 0, 0),
            "{kind:?}"
        );
        assert!(bus.dead_letters(None).await.unwrap().is_empty(), "{kind:?}");
        // In the order they were published, each as its second attempt.
        let second = |i: &str, seq| (i.to_string(), seq, 2);
        assert_eq!(
            mailer.delivered(),
            [
                second("i-1", 1),
                second("i-2", 1),
                second("i-1", 2),
                second("i-1", 3)
            ],
            "{kind:?}"
        );
        let stats = bus.statistics().await.unwrap();
        assert_eq!((stats.delivered, stats.failed), (4, 4), "{kind:?}");
        assert_eq!(
            bus.replay_dead_letters(None).await.unwrap(),
            ReplayReport::default()
        );
        assert!(is_unknown(
            bus.replay_dead_letters(Some("mailr")).await,
            "mailr"
        ));
        bus.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_failing_for_one_aggregate_holds_back_its_later_letters_only() {
    for kind in KINDS {
        let (mailer, audit) = (Gate::new(), Gate::new());
        let (bus, _dir) = bus(kind, &[("mailer", &mailer), ("audit", &audit)]).await;
        publish(
            &bus,
            &[("bad", 1), ("ok", 1), ("bad", 2), ("ok", 2), ("bad", 3)],
        )
        .await;
        assert_eq!(dead_count(&bus, "mailer").await, 5, "{kind:?}");
        let failures_before = bus.failures("mailer", 100).await.unwrap().len();

        // The mailer still fails for `bad`; the audit is healthy again.
        mailer.only(&["bad"]);
        audit.set(Broken::Nothing);
        assert_eq!(
            bus.replay_dead_letters(None).await.unwrap(),
            report(2 + 5, 1, 2, 0),
            "{kind:?}"
        );
        let mailer_left: Vec<u64> = bus
            .dead_letters(Some("mailer"))
            .await
            .unwrap()
            .iter()
            .map(|d| d.position)
            .collect();
        assert_eq!(mailer_left.len(), 3, "{kind:?}");
        assert_eq!(dead_count(&bus, "audit").await, 0, "{kind:?}");
        assert_eq!(
            mailer.delivered(),
            [("ok".to_string(), 1, 2), ("ok".to_string(), 2, 2)],
            "{kind:?}"
        );
        // `bad` was tried once (its first letter), its later letters not at all; that
        // failed attempt is recorded.
        let bad_replays: Vec<(u64, u32)> = mailer
            .attempts
            .lock()
            .unwrap()
            .iter()
            .skip(5)
            .filter(|a| a.invoice == "bad")
            .map(|a| (a.seq, a.attempt))
            .collect();
        assert_eq!(bad_replays, [(1, 2)], "{kind:?}");
        assert_eq!(
            bus.failures("mailer", 100).await.unwrap().len(),
            failures_before + 1,
            "{kind:?}"
        );
        assert_eq!(audit.delivered().len(), 5, "{kind:?}");

        // Once `bad` is fixed, one subscription's replay delivers its letters in order.
        mailer.set(Broken::Nothing);
        assert_eq!(
            bus.replay_dead_letters(Some("mailer")).await.unwrap(),
            report(3, 0, 0, 0),
            "{kind:?}"
        );
        let bad_delivered: Vec<u64> = mailer
            .delivered()
            .iter()
            .filter(|d| d.0 == "bad")
            .map(|d| d.1)
            .collect();
        assert_eq!(bad_delivered, [1, 2, 3], "{kind:?}");
        assert!(bus.dead_letters(None).await.unwrap().is_empty(), "{kind:?}");
        bus.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_of_all_leaves_the_letters_of_a_subscription_no_longer_registered() {
    for kind in KINDS {
        let (mailer, audit) = (Gate::new(), Gate::new());
        let (bus, _dir) = bus(kind, &[("mailer", &mailer), ("audit", &audit)]).await;
        publish(&bus, &[("i-1", 1), ("i-2", 1)]).await;
        assert!(bus.unsubscribe("audit"));
        mailer.set(Broken::Nothing);
        assert_eq!(
            bus.replay_dead_letters(None).await.unwrap(),
            report(2, 0, 0, 2),
            "{kind:?}"
        );
        assert_eq!(dead_count(&bus, "audit").await, 2, "{kind:?}");
        assert!(is_unknown(
            bus.replay_dead_letters(Some("audit")).await,
            "audit"
        ));
        // Discarding all reaches them.
        assert_eq!(bus.discard_dead_letters(None).await.unwrap(), 2);
        bus.stop().await.unwrap();
    }
}

/// A dead letter whose stored row is damaged cannot be replayed: it counts as failed and
/// stays, and the replay goes on with the others, its own aggregate's included (what the
/// row holds, its aggregate too, cannot be read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_row_counts_as_failed_and_the_replay_goes_on() {
    let dir = tempfile::Builder::new()
        .prefix("eventfold-bus-admin-damaged-")
        .tempdir()
        .unwrap();
    let path = dir.path().join("bus.db");
    let store = SqliteEventStore::open(&path, SqliteOptions::new())
        .await
        .unwrap();
    for (invoice, seq) in [("i-1", 1), ("i-2", 1), ("i-1", 2), ("i-2", 2)] {
        let event = NewEvent::from_event(&issued(invoice, seq), Metadata::new()).unwrap();
        store
            .append(
                &StreamId::new("Invoice", invoice),
                ExpectedVersion::Any,
                vec![event],
            )
            .await
            .unwrap();
    }
    store.close().await.unwrap();
    // Damage the row at position 2 (i-2's first event) behind the store's back: its id
    // cannot be read.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute(
            "UPDATE events SET event_id = x'0102' WHERE position = 2",
            [],
        )
        .unwrap();
    let store = SqliteEventStore::open(&path, SqliteOptions::new())
        .await
        .unwrap();
    let mailer = Gate::new();
    let bus = EventBus::builder().store(store).build().unwrap();
    bus.subscribe("mailer", mailer.handler())
        .retry(RetryPolicy::never())
        .register()
        .unwrap();
    bus.start().await.unwrap();
    bus.wait_idle().await.unwrap();
    // Listed by id, which need not follow the positions (the damaged row is dead-lettered
    // at once, the others by a worker).
    let positions = |dead: Vec<eventfold::DeadLetter>| -> Vec<u64> {
        let mut positions: Vec<u64> = dead.iter().map(|d| d.position).collect();
        positions.sort();
        positions
    };
    assert_eq!(
        positions(bus.dead_letters(None).await.unwrap()),
        [1, 2, 3, 4]
    );

    mailer.set(Broken::Nothing);
    assert_eq!(
        bus.replay_dead_letters(None).await.unwrap(),
        report(3, 1, 0, 0)
    );
    assert_eq!(positions(bus.dead_letters(None).await.unwrap()), [2]);
    assert_eq!(
        mailer.delivered(),
        [
            ("i-1".to_string(), 1, 2),
            ("i-1".to_string(), 2, 2),
            ("i-2".to_string(), 2, 2)
        ]
    );
    bus.stop().await.unwrap();
}

/// The outcome a finished replay request recorded.
async fn outcome_of(store: &SqliteEventStore, id: u64) -> Option<eventfold::ReplayOutcome> {
    use eventfold::backend::SubscriptionStore;
    let request = store.replay_request(id).await.unwrap().expect("stored");
    request.finished.map(|f| f.outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_replay_requests_are_carried_out_by_the_bus_running_their_subscription() {
    use eventfold::backend::SubscriptionStore;
    use eventfold::backend::Utc;
    use eventfold::{ReplayOutcome, ReplayTarget};

    let dir = tempfile::Builder::new()
        .prefix("eventfold-bus-admin-")
        .tempdir()
        .unwrap();
    let store = SqliteEventStore::open(dir.path().join("bus.db"), SqliteOptions::new())
        .await
        .unwrap();
    let bus = EventBus::builder()
        .workers(2)
        .store(store.clone())
        .build()
        .unwrap();
    let (mailer, audit) = (Gate::new(), Gate::new());
    for (name, gate) in [("mailer", &mailer), ("audit", &audit)] {
        bus.subscribe(name, gate.handler())
            .retry(RetryPolicy::never())
            .register()
            .unwrap();
    }
    bus.start().await.unwrap();
    publish(&bus, &[("i-1", 1), ("i-2", 1), ("i-1", 2)]).await;
    let letters = bus.dead_letters(Some("mailer")).await.unwrap();
    assert_eq!(letters.len(), 3);

    mailer.set(Broken::Nothing);
    let request = |target| {
        let store = store.clone();
        async move {
            let mut stored = store.request_replay(target, Utc::now()).await.unwrap();
            assert_eq!(stored.len(), 1, "{stored:?}");
            stored.remove(0)
        }
    };
    let one = request(ReplayTarget::DeadLetter { id: letters[1].id }).await;
    assert_eq!(one.subscription, "mailer");
    let all_audit = request(ReplayTarget::Subscription {
        name: "audit".into(),
    })
    .await;
    let elsewhere = request(ReplayTarget::Subscription {
        name: "elsewhere".into(),
    })
    .await;
    // Asked for twice: the first request replays it, so the second finds it gone (in the
    // order of their ids, whichever pass carries them out).
    let first = request(ReplayTarget::DeadLetter { id: letters[0].id }).await;
    let gone = request(ReplayTarget::DeadLetter { id: letters[0].id }).await;
    bus.discard_dead_letter(letters[2].id).await.unwrap();
    assert!(matches!(
        store
            .request_replay(ReplayTarget::DeadLetter { id: letters[2].id }, Utc::now())
            .await,
        Err(Error::DeadLetterNotFound { id }) if id == letters[2].id
    ));

    // The bus's own task may carry some out first (after a lease round), one at a time
    // with this call: the outcomes are the same.
    bus.carry_out_replay_requests().await.unwrap();
    assert_eq!(
        outcome_of(&store, one.id).await,
        Some(ReplayOutcome::Done {
            replayed: 1,
            failed: 0,
            held_back: 0
        })
    );
    assert_eq!(
        outcome_of(&store, first.id).await,
        Some(ReplayOutcome::Done {
            replayed: 1,
            failed: 0,
            held_back: 0
        })
    );
    assert_eq!(
        mailer.delivered(),
        [("i-2".to_string(), 1, 2), ("i-1".to_string(), 1, 2)]
    );
    assert!(bus.dead_letters(Some("mailer")).await.unwrap().is_empty());
    // Audit still fails: i-1's first letter fails, its second is held back behind it.
    assert_eq!(
        outcome_of(&store, all_audit.id).await,
        Some(ReplayOutcome::Done {
            replayed: 0,
            failed: 2,
            held_back: 1
        })
    );
    assert_eq!(dead_count(&bus, "audit").await, 3);
    match outcome_of(&store, gone.id).await {
        Some(ReplayOutcome::Failed { reason }) => {
            assert!(reason.contains("is gone"), "{reason}");
        }
        other => panic!("expected a failed outcome, got {other:?}"),
    }
    // No bus runs `elsewhere`: its request waits for one.
    assert_eq!(outcome_of(&store, elsewhere.id).await, None);
    assert_eq!(
        store
            .pending_replay_requests("elsewhere")
            .await
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect::<Vec<_>>(),
        [elsewhere.id]
    );
    assert_eq!(bus.carry_out_replay_requests().await.unwrap(), 0);
    bus.stop().await.unwrap();
}
