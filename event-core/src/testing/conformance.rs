//! The store conformance suite: the [`EventStore`] contract as executable cases.
//!
//! The cases follow the contract's parts, and each takes the part it tests: most take an
//! [`EventLog`] (appends, versions, positions, reads, replay, the head watch), one a
//! [`SnapshotStore`](crate::SnapshotStore), five a [`SubscriptionStore`] (checkpoints,
//! dead letters, failure records, replay requests), and four the whole [`EventStore`], where one part's
//! records show in the log's [`statistics`](EventLog::statistics).
//!
//! The cases of the [`LeaseStore`] part (segment leases, fencing, members, reset) run
//! with [`lease_conformance_tests!`](crate::lease_conformance_tests), the same way.
//!
//! A backend runs every case against fresh stores from its own factory with
//! [`store_conformance_tests!`](crate::store_conformance_tests), which expands to one
//! `#[test]` per case so failures are reported by name:
//!
//! ```
//! use eventfold_core::InMemoryEventStore;
//! use eventfold_core::testing::conformance::StoreUnderTest;
//!
//! async fn memory_store() -> StoreUnderTest {
//!     StoreUnderTest::new(InMemoryEventStore::new())
//! }
//!
//! eventfold_core::store_conformance_tests!(memory_store);
//! # fn main() {}
//! ```
//!
//! The cases use raw [`NewEvent`]s with made-up type names: a store never decodes payloads.

use std::any::Any;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use uuid::Uuid;

use crate::error::Error;
use crate::lease::{LeaseStore, MAX_LEASE_TTL, MAX_SEGMENTS, SegmentLease, SegmentState};
use crate::record::{
    AppendRequest, ExpectedVersion, FailureRecord, FinishedReplay, Metadata, NewDeadLetter,
    NewEvent, RecordedEvent, ReplayOutcome, ReplayTarget, Snapshot, StreamId,
};
use crate::store::{
    DEFAULT_FAILURE_RETENTION, DEFAULT_REPLAY_RETENTION, EventLog, EventStore, IntoStore,
    SubscriptionStore,
};

/// A store for one case, with whatever must live as long as it (a temporary directory).
pub struct StoreUnderTest {
    /// The store.
    pub store: Arc<dyn EventStore>,
    _guard: Option<Box<dyn Any + Send + Sync>>,
}

impl StoreUnderTest {
    /// A store that needs nothing else: a store handle, an `Arc` of one, or an
    /// `Arc<dyn EventStore>`.
    pub fn new(store: impl IntoStore) -> Self {
        StoreUnderTest {
            store: store.into_store(),
            _guard: None,
        }
    }

    /// A store with a guard dropped after the case (after the store).
    pub fn with_guard(store: impl IntoStore, guard: impl Any + Send + Sync) -> Self {
        StoreUnderTest {
            store: store.into_store(),
            _guard: Some(Box::new(guard)),
        }
    }
}

/// Runs one case on a fresh store from `factory`, on a multi-threaded runtime. A case of
/// one part takes the store as that part: `run(factory, |store| case(store))` upcasts it.
pub fn run<F, Fut, C, CFut>(factory: F, case: C)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = StoreUnderTest>,
    C: FnOnce(Arc<dyn EventStore>) -> CFut,
    CFut: Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let under_test = factory().await;
        case(Arc::clone(&under_test.store)).await;
        drop(under_test);
    });
}

/// What a suite without a skip condition skips: nothing.
#[doc(hidden)]
pub fn never_skip() -> bool {
    false
}

/// Expands to one `#[test]` per conformance case, each on a fresh store from `$factory`
/// (an `async fn() -> StoreUnderTest`).
///
/// A backend whose tests need a server passes `skip_if = path`, a `fn() -> bool` that each
/// case calls first: when it returns true the case passes without running (the function
/// says why, once). `store_conformance_tests!(server_store, skip_if = no_server);`
#[macro_export]
macro_rules! store_conformance_tests {
    ($factory:path) => {
        $crate::store_conformance_tests!(
            $factory,
            skip_if = $crate::testing::conformance::never_skip
        );
    };
    ($factory:path, skip_if = $skip:path) => {
        $crate::store_conformance_tests!(@cases $factory, $skip;
            // EventLog
            append_assigns_gap_free_versions_and_positions,
            multi_event_append_is_atomic,
            batch_appends_to_several_streams_atomically,
            expected_version_any,
            expected_version_no_stream,
            expected_version_exact,
            reappending_the_same_events_is_idempotent,
            same_event_id_with_other_content_is_refused,
            malformed_appends_are_refused,
            streams_are_isolated,
            read_stream_from_a_version,
            read_stream_in_pages,
            replay_stream_lends_the_stream_in_order_and_stops_at_an_error,
            read_all_in_commit_order_from_a_position_with_a_limit,
            get_by_event_id,
            recorded_fields_round_trip_exactly,
            head_position_and_its_watch_follow_commits,
            concurrent_appends_race_without_gaps_or_double_winners,
            // SnapshotStore
            snapshots_keep_the_latest,
            a_snapshot_ahead_of_its_stream_is_replaced,
            // SubscriptionStore
            checkpoints_are_saved_and_overwritten,
            dead_letters_are_listed_filtered_and_removed,
            failures_are_recorded_per_subscription,
            replay_requests_are_stored_listed_and_finished_once,
            replay_requests_for_everything_follow_the_dead_letters,
            finished_replay_requests_beyond_the_retention_are_removed,
            // the parts together (their counts in the log's statistics)
            one_dead_letter_per_subscription_and_event,
            failure_records_beyond_the_retention_are_removed,
            bulk_clears_remove_dead_letters_and_failures,
            statistics_describe_the_store,
        );
    };
    (@cases $factory:path, $skip:path; $($case:ident),+ $(,)?) => {
        $(
            #[test]
            fn $case() {
                if $skip() {
                    return;
                }
                $crate::testing::conformance::run($factory, |store| {
                    $crate::testing::conformance::$case(store)
                });
            }
        )+
    };
}

fn stream(id: &str) -> StreamId {
    StreamId::new("Tested", id)
}

fn at(micros: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(1_760_000_000_000_000 + micros)
        .single()
        .expect("a valid time")
}

/// A new event with payload `{"n":n}`.
fn event(n: u64) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "Counted".to_owned(),
        schema_version: 1,
        occurred_at: at(n as i64),
        metadata: Metadata::default(),
        payload: format!(r#"{{"n":{n}}}"#),
    }
}

fn events(range: std::ops::RangeInclusive<u64>) -> Vec<NewEvent> {
    range.map(event).collect()
}

fn versions(recorded: &[RecordedEvent]) -> Vec<u64> {
    recorded.iter().map(|e| e.version).collect()
}

fn positions(recorded: &[RecordedEvent]) -> Vec<u64> {
    recorded.iter().map(|e| e.position).collect()
}

#[track_caller]
fn assert_conflict(result: crate::Result<impl std::fmt::Debug>, want: ExpectedVersion, have: u64) {
    match result {
        Err(Error::VersionConflict {
            expected, actual, ..
        }) => {
            assert_eq!(expected, want, "the conflict carries the expected version");
            assert_eq!(actual, have, "the conflict carries the actual version");
        }
        other => panic!("expected a version conflict, got {other:?}"),
    }
}

/// Versions run 1.. per stream and positions 1.. over the log, interleaved streams too.
pub async fn append_assigns_gap_free_versions_and_positions(store: Arc<dyn EventLog>) {
    let (a, b) = (stream("a"), stream("b"));
    let out = store
        .append(&a, ExpectedVersion::NoStream, events(1..=3))
        .await
        .unwrap();
    assert_eq!(
        (out.version, out.first_position, out.last_position),
        (3, 1, 3)
    );
    let out = store
        .append(&b, ExpectedVersion::NoStream, events(1..=2))
        .await
        .unwrap();
    assert_eq!(
        (out.version, out.first_position, out.last_position),
        (2, 4, 5)
    );
    let out = store
        .append(&a, ExpectedVersion::Exact(3), events(4..=4))
        .await
        .unwrap();
    assert_eq!(
        (out.version, out.first_position, out.last_position),
        (4, 6, 6)
    );

    let a_events = store.read_stream(&a, 1).await.unwrap();
    assert_eq!(versions(&a_events), [1, 2, 3, 4]);
    assert_eq!(positions(&a_events), [1, 2, 3, 6]);
    let all = store.read_all(1, 100).await.unwrap();
    assert_eq!(positions(&all), [1, 2, 3, 4, 5, 6]);
    assert_eq!(store.stream_version(&a).await.unwrap(), 4);
    assert_eq!(store.stream_version(&b).await.unwrap(), 2);
    assert_eq!(store.stream_version(&stream("none")).await.unwrap(), 0);
}

/// A failing multi-event append stores none of its events.
pub async fn multi_event_append_is_atomic(store: Arc<dyn EventLog>) {
    let s = stream("atomic");
    store
        .append(&s, ExpectedVersion::Any, events(1..=2))
        .await
        .unwrap();
    let taken = store.read_stream(&s, 1).await.unwrap()[0].event_id;

    // Wrong expected version: nothing of the five is stored.
    let result = store
        .append(&s, ExpectedVersion::Exact(1), events(3..=7))
        .await;
    assert_conflict(result, ExpectedVersion::Exact(1), 2);

    // The last of three events reuses a stored id with other content: nothing is stored.
    let mut batch = events(3..=5);
    batch[2].event_id = taken;
    match store.append(&s, ExpectedVersion::Exact(2), batch).await {
        Err(Error::DuplicateEventId { event_id }) => assert_eq!(event_id, taken),
        other => panic!("expected DuplicateEventId, got {other:?}"),
    }

    assert_eq!(store.stream_version(&s).await.unwrap(), 2);
    assert_eq!(store.head_position().await.unwrap(), 2);
    assert_eq!(store.read_all(1, 100).await.unwrap().len(), 2);

    // And the store goes on from where it was.
    let out = store
        .append(&s, ExpectedVersion::Exact(2), events(3..=4))
        .await
        .unwrap();
    assert_eq!(
        (out.version, out.first_position, out.last_position),
        (4, 3, 4)
    );
}

/// `append_batch` stores several streams' events together, or none of them.
pub async fn batch_appends_to_several_streams_atomically(store: Arc<dyn EventLog>) {
    let (a, b, c) = (stream("batch-a"), stream("batch-b"), stream("batch-c"));
    let request = |s: &StreamId, expected, range| AppendRequest {
        stream: s.clone(),
        expected,
        events: events(range),
    };
    let outcomes = store
        .append_batch(vec![
            request(&a, ExpectedVersion::NoStream, 1..=2),
            request(&b, ExpectedVersion::NoStream, 1..=1),
        ])
        .await
        .unwrap();
    let got: Vec<_> = outcomes
        .iter()
        .map(|o| (o.version, o.first_position, o.last_position))
        .collect();
    assert_eq!(got, [(2, 1, 2), (1, 3, 3)]);

    // The second request conflicts: the first and third are not stored either.
    let result = store
        .append_batch(vec![
            request(&a, ExpectedVersion::Exact(2), 3..=3),
            request(&b, ExpectedVersion::NoStream, 2..=2),
            request(&c, ExpectedVersion::Any, 1..=1),
        ])
        .await;
    assert_conflict(result, ExpectedVersion::NoStream, 1);
    assert_eq!(store.head_position().await.unwrap(), 3);
    assert_eq!(store.stream_version(&a).await.unwrap(), 2);
    assert_eq!(store.stream_version(&c).await.unwrap(), 0);

    // One stream twice in a batch is refused.
    let twice = store
        .append_batch(vec![
            request(&c, ExpectedVersion::Any, 1..=1),
            request(&c, ExpectedVersion::Any, 2..=2),
        ])
        .await;
    assert!(
        matches!(twice, Err(Error::InvalidAppend { .. })),
        "{twice:?}"
    );
    assert!(store.append_batch(vec![]).await.unwrap().is_empty());
    assert_eq!(store.head_position().await.unwrap(), 3);
}

/// `Any` appends whatever the version.
pub async fn expected_version_any(store: Arc<dyn EventLog>) {
    let s = stream("any");
    assert_eq!(
        store
            .append(&s, ExpectedVersion::Any, events(1..=1))
            .await
            .unwrap()
            .version,
        1
    );
    assert_eq!(
        store
            .append(&s, ExpectedVersion::Any, events(2..=3))
            .await
            .unwrap()
            .version,
        3
    );
}

/// `NoStream` succeeds once, then conflicts with the actual version.
pub async fn expected_version_no_stream(store: Arc<dyn EventLog>) {
    let s = stream("new");
    store
        .append(&s, ExpectedVersion::NoStream, events(1..=2))
        .await
        .unwrap();
    let result = store
        .append(&s, ExpectedVersion::NoStream, events(3..=3))
        .await;
    assert_conflict(result, ExpectedVersion::NoStream, 2);
}

/// `Exact` succeeds at the version, and conflicts above or below it; `Exact(0)` is a new stream.
pub async fn expected_version_exact(store: Arc<dyn EventLog>) {
    let s = stream("exact");
    store
        .append(&s, ExpectedVersion::Exact(0), events(1..=1))
        .await
        .unwrap();
    store
        .append(&s, ExpectedVersion::Exact(1), events(2..=2))
        .await
        .unwrap();
    assert_conflict(
        store
            .append(&s, ExpectedVersion::Exact(1), events(3..=3))
            .await,
        ExpectedVersion::Exact(1),
        2,
    );
    assert_conflict(
        store
            .append(&s, ExpectedVersion::Exact(5), events(3..=3))
            .await,
        ExpectedVersion::Exact(5),
        2,
    );
    assert_conflict(
        store
            .append(&stream("other"), ExpectedVersion::Exact(1), events(1..=1))
            .await,
        ExpectedVersion::Exact(1),
        0,
    );
    assert_eq!(store.stream_version(&s).await.unwrap(), 2);
}

/// Sending an append again (say, after a lost reply) returns the first outcome and stores
/// nothing new, even though its expected version is stale by then.
pub async fn reappending_the_same_events_is_idempotent(store: Arc<dyn EventLog>) {
    let s = stream("idem");
    store
        .append(&s, ExpectedVersion::Any, events(1..=1))
        .await
        .unwrap();
    let batch = events(2..=4);
    let first = store
        .append(&s, ExpectedVersion::Exact(1), batch.clone())
        .await
        .unwrap();
    let again = store
        .append(&s, ExpectedVersion::Exact(1), batch.clone())
        .await
        .unwrap();
    assert_eq!(first, again);
    let single = store
        .append(&s, ExpectedVersion::Any, vec![batch[0].clone()])
        .await;
    assert!(
        single.is_ok(),
        "one already stored event alone is idempotent too: {single:?}"
    );
    assert_eq!(store.head_position().await.unwrap(), 4);
    assert_eq!(store.stream_version(&s).await.unwrap(), 4);
}

/// An event id stored with other content (payload, type, metadata, stream) is refused.
pub async fn same_event_id_with_other_content_is_refused(store: Arc<dyn EventLog>) {
    let s = stream("dup");
    let original = event(1);
    store
        .append(&s, ExpectedVersion::Any, vec![original.clone()])
        .await
        .unwrap();

    let mut other_payload = original.clone();
    other_payload.payload = r#"{"n":2}"#.to_owned();
    let mut other_type = original.clone();
    other_type.event_type = "Other".to_owned();
    let mut other_metadata = original.clone();
    other_metadata.metadata = Metadata::new().with("user", "eve");
    for changed in [other_payload, other_type, other_metadata] {
        match store.append(&s, ExpectedVersion::Any, vec![changed]).await {
            Err(Error::DuplicateEventId { event_id }) => assert_eq!(event_id, original.event_id),
            other => panic!("expected DuplicateEventId, got {other:?}"),
        }
    }
    match store
        .append(
            &stream("elsewhere"),
            ExpectedVersion::Any,
            vec![original.clone()],
        )
        .await
    {
        Err(Error::DuplicateEventId { event_id }) => assert_eq!(event_id, original.event_id),
        other => panic!("expected DuplicateEventId for another stream, got {other:?}"),
    }
    let stored = store.get(original.event_id).await.unwrap().unwrap();
    assert_eq!(stored.payload, original.payload);
    assert_eq!(store.head_position().await.unwrap(), 1);
}

/// No events, an empty stream name, schema version 0, one id twice: refused, nothing stored.
pub async fn malformed_appends_are_refused(store: Arc<dyn EventLog>) {
    let s = stream("bad");
    let invalid = |r: crate::Result<_>| matches!(r, Err(Error::InvalidAppend { .. }));
    assert!(invalid(
        store.append(&s, ExpectedVersion::Any, vec![]).await
    ));
    assert!(invalid(
        store
            .append(
                &StreamId::new("Tested", ""),
                ExpectedVersion::Any,
                events(1..=1)
            )
            .await
    ));
    let mut zero = event(1);
    zero.schema_version = 0;
    assert!(invalid(
        store.append(&s, ExpectedVersion::Any, vec![zero]).await
    ));
    let twice = event(1);
    assert!(invalid(
        store
            .append(&s, ExpectedVersion::Any, vec![twice.clone(), twice])
            .await
    ));
    assert_eq!(store.head_position().await.unwrap(), 0);
}

/// Streams with the same id under other aggregate types are distinct.
pub async fn streams_are_isolated(store: Arc<dyn EventLog>) {
    let account = StreamId::new("Account", "42");
    let order = StreamId::new("Order", "42");
    store
        .append(&account, ExpectedVersion::NoStream, events(1..=2))
        .await
        .unwrap();
    store
        .append(&order, ExpectedVersion::NoStream, events(1..=1))
        .await
        .unwrap();
    let read = store.read_stream(&order, 1).await.unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!((&*read[0].aggregate_type, read[0].version), ("Order", 1));
    assert_eq!(store.stream_version(&account).await.unwrap(), 2);
}

/// `read_stream_page` returns the first `limit` events of what `read_stream` returns:
/// pages read one after the other give the whole stream, in order, once.
pub async fn read_stream_in_pages(store: Arc<dyn EventLog>) {
    let s = stream("paged");
    store
        .append(&s, ExpectedVersion::Any, events(1..=10))
        .await
        .unwrap();
    let whole = store.read_stream(&s, 3).await.unwrap();
    assert_eq!(store.read_stream_page(&s, 3, 100).await.unwrap(), whole);
    assert_eq!(store.read_stream_page(&s, 3, 4).await.unwrap(), whole[..4]);
    assert!(store.read_stream_page(&s, 3, 0).await.unwrap().is_empty());
    let mut pages = Vec::new();
    let mut from = 1;
    loop {
        let page = store.read_stream_page(&s, from, 3).await.unwrap();
        assert!(page.len() <= 3);
        let Some(last) = page.last() else {
            break;
        };
        from = last.version + 1;
        pages.extend(page);
    }
    assert_eq!(versions(&pages), (1..=10).collect::<Vec<_>>());
    assert!(
        store
            .read_stream_page(&stream("missing"), 1, 3)
            .await
            .unwrap()
            .is_empty()
    );
}

/// `read_stream` starts at the given version; past the end it is empty.
pub async fn read_stream_from_a_version(store: Arc<dyn EventLog>) {
    let s = stream("from");
    store
        .append(&s, ExpectedVersion::Any, events(1..=10))
        .await
        .unwrap();
    assert_eq!(
        versions(&store.read_stream(&s, 1).await.unwrap()),
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(versions(&store.read_stream(&s, 0).await.unwrap()).len(), 10);
    assert_eq!(
        versions(&store.read_stream(&s, 8).await.unwrap()),
        [8, 9, 10]
    );
    assert!(store.read_stream(&s, 11).await.unwrap().is_empty());
    assert!(
        store
            .read_stream(&stream("missing"), 1)
            .await
            .unwrap()
            .is_empty()
    );
}

/// What a replay saw, kept by the visitor.
struct Collect {
    seen: Vec<(u64, String, String)>,
    fail_at: Option<u64>,
}

impl crate::store::ReplayVisitor for Collect {
    fn visit(&mut self, e: crate::record::ReplayedEvent<'_>) -> crate::Result<()> {
        if self.fail_at == Some(e.version) {
            // A decoding error, which the store locates.
            return Err(Error::Payload {
                event_type: format!("stop at {}", e.version),
                event_id: None,
                position: None,
                source: serde_json::from_str::<u8>("x").unwrap_err(),
            });
        }
        self.seen
            .push((e.version, e.event_type.to_owned(), e.payload.to_owned()));
        Ok(())
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

/// `replay_stream` lends the same events as `read_stream`, in version order, from a
/// version on, and ends at the first error of its visitor, naming the event's id and
/// position in it.
pub async fn replay_stream_lends_the_stream_in_order_and_stops_at_an_error(
    store: Arc<dyn EventLog>,
) {
    let s = stream("replay");
    store
        .append(&s, ExpectedVersion::Any, events(1..=3))
        .await
        .unwrap();
    store
        .append(&stream("other"), ExpectedVersion::Any, events(1..=1))
        .await
        .unwrap();
    store
        .append(&s, ExpectedVersion::Any, events(4..=5))
        .await
        .unwrap();
    let replay = |from, fail_at| {
        let store = Arc::clone(&store);
        let s = s.clone();
        async move {
            let visitor = Box::new(Collect {
                seen: Vec::new(),
                fail_at,
            });
            let back = store.replay_stream(&s, from, visitor).await?;
            Ok::<_, Error>(back.into_any().downcast::<Collect>().unwrap().seen)
        }
    };
    let all = replay(1, None).await.unwrap();
    let read = store.read_stream(&s, 1).await.unwrap();
    let expected: Vec<_> = read
        .iter()
        .map(|e| (e.version, e.event_type.to_string(), e.payload.clone()))
        .collect();
    assert_eq!(all, expected);
    assert_eq!(positions(&read), [1, 2, 3, 5, 6]);
    let tail = replay(4, None).await.unwrap();
    assert_eq!(tail.iter().map(|e| e.0).collect::<Vec<_>>(), [4, 5]);
    assert!(replay(6, None).await.unwrap().is_empty());
    match replay(1, Some(4)).await {
        Err(Error::Payload {
            event_type,
            event_id,
            position,
            ..
        }) => {
            assert_eq!(event_type, "stop at 4");
            assert_eq!((event_id, position), (Some(read[3].event_id), Some(5)));
        }
        other => panic!("expected the visitor's error, got {other:?}"),
    }
}

/// `read_all` pages through the log in commit order.
pub async fn read_all_in_commit_order_from_a_position_with_a_limit(store: Arc<dyn EventLog>) {
    for i in 0..5 {
        let s = stream(&format!("s{}", i % 2));
        store
            .append(&s, ExpectedVersion::Any, events(1..=3))
            .await
            .unwrap();
    }
    let page = store.read_all(4, 5).await.unwrap();
    assert_eq!(positions(&page), [4, 5, 6, 7, 8]);
    let mut seen = Vec::new();
    let mut from = 1;
    loop {
        let page = store.read_all(from, 4).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 4);
        from = page.last().unwrap().position + 1;
        seen.extend(positions(&page));
    }
    assert_eq!(seen, (1..=15).collect::<Vec<_>>());
    assert!(store.read_all(16, 10).await.unwrap().is_empty());
    assert!(store.read_all(1, 0).await.unwrap().is_empty());
}

/// `get` finds an event by id; an unknown id is `None`.
pub async fn get_by_event_id(store: Arc<dyn EventLog>) {
    let batch = events(1..=3);
    store
        .append(&stream("get"), ExpectedVersion::Any, batch.clone())
        .await
        .unwrap();
    let found = store.get(batch[1].event_id).await.unwrap().unwrap();
    assert_eq!((found.version, found.position), (2, 2));
    assert!(store.get(Uuid::now_v7()).await.unwrap().is_none());
}

/// Every field comes back exactly as appended: ids, times to the microsecond and below,
/// metadata, payload text with escapes and non-ASCII.
pub async fn recorded_fields_round_trip_exactly(store: Arc<dyn EventLog>) {
    let correlation = Uuid::now_v7();
    let new = NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "Named.Type-2".to_owned(),
        schema_version: 7,
        occurred_at: Utc.timestamp_opt(1_700_000_000, 123_456_789).unwrap(),
        metadata: Metadata::new()
            .with_correlation_id(correlation)
            .with_causation_id(Uuid::nil())
            .with("user", "zoë")
            .with("source", "api"),
        payload: r#"{"text":"line\nquote\" ünï ☃","n":-1.5e3,"nested":{"a":[1,null,true]}}"#
            .to_owned(),
    };
    let s = StreamId::new("Round", "trip/é");
    let before = Utc::now();
    store
        .append(&s, ExpectedVersion::Any, vec![new.clone()])
        .await
        .unwrap();
    let got = store.get(new.event_id).await.unwrap().unwrap();
    assert_eq!(got.event_id, new.event_id);
    assert_eq!(
        (&*got.aggregate_type, got.aggregate_id.as_str()),
        ("Round", "trip/é")
    );
    assert_eq!((got.version, got.position), (1, 1));
    assert_eq!(got.event_type, new.event_type);
    assert_eq!(got.schema_version, 7);
    assert_eq!(got.occurred_at, new.occurred_at);
    assert!(got.recorded_at >= before - chrono::Duration::seconds(1));
    assert_eq!(got.metadata, new.metadata);
    assert_eq!(got.payload, new.payload);
    assert!(new.same_content(&s, &got));
    assert_eq!(store.read_stream(&s, 1).await.unwrap(), vec![got.clone()]);
    assert_eq!(store.read_all(1, 1).await.unwrap(), vec![got]);
}

/// The head position and its watch move with each commit.
pub async fn head_position_and_its_watch_follow_commits(store: Arc<dyn EventLog>) {
    let mut head = store.watch_head();
    assert_eq!(*head.borrow_and_update(), 0);
    assert_eq!(store.head_position().await.unwrap(), 0);
    store
        .append(&stream("w"), ExpectedVersion::Any, events(1..=3))
        .await
        .unwrap();
    head.changed().await.unwrap();
    assert_eq!(*head.borrow_and_update(), 3);
    assert_eq!(store.head_position().await.unwrap(), 3);
    // A refused append does not move it.
    let _ = store
        .append(&stream("w"), ExpectedVersion::NoStream, events(4..=4))
        .await;
    store
        .append(&stream("w"), ExpectedVersion::Exact(3), events(4..=4))
        .await
        .unwrap();
    head.changed().await.unwrap();
    assert_eq!(*head.borrow_and_update(), 4);
}

/// 8 tasks race to append to 10 streams, each reading the version and appending with
/// `Exact` expectation, while a reader tails the log. Exactly one append wins per stream
/// version; no version or position is missing or doubled; positions only grow, and the
/// tailing reader never finds a gap that is filled later.
pub async fn concurrent_appends_race_without_gaps_or_double_winners(store: Arc<dyn EventLog>) {
    const TASKS: usize = 8;
    const STREAMS: usize = 10;
    const ROUNDS: usize = 25;
    let tail = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let mut next = 1;
            let mut quiet = 0;
            while quiet < 3 {
                let page = store.read_all(next, 50).await.unwrap();
                for e in &page {
                    assert_eq!(e.position, next, "the log has a gap or runs backwards");
                    next += 1;
                }
                if page.is_empty() {
                    quiet += 1;
                    tokio::task::yield_now().await;
                } else {
                    quiet = 0;
                }
            }
            next - 1
        })
    };
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut wins = Vec::new();
            for round in 0..ROUNDS {
                let s = stream(&format!("race-{}", (t + round) % STREAMS));
                loop {
                    let version = store.stream_version(&s).await.unwrap();
                    let expected = ExpectedVersion::Exact(version);
                    match store.append(&s, expected, events(1..=2)).await {
                        Ok(out) => {
                            assert_eq!(out.version, version + 2);
                            wins.push((s.aggregate_id.clone(), version, out));
                            break;
                        }
                        Err(Error::VersionConflict { actual, .. }) => {
                            assert!(actual > version, "a conflict means someone else won");
                        }
                        Err(e) => panic!("unexpected error {e}"),
                    }
                }
            }
            wins
        }));
    }
    let mut winners: HashMap<(String, u64), usize> = HashMap::new();
    let mut all_positions = Vec::new();
    for task in tasks {
        for (id, expected, out) in task.await.unwrap() {
            *winners.entry((id, expected)).or_default() += 1;
            all_positions.extend(out.first_position..=out.last_position);
        }
    }
    assert!(
        winners.values().all(|&n| n == 1),
        "one winner per expected version"
    );
    assert_eq!(winners.len(), TASKS * ROUNDS);
    all_positions.sort_unstable();
    let total = (TASKS * ROUNDS * 2) as u64;
    assert_eq!(all_positions, (1..=total).collect::<Vec<_>>());

    let log = store.read_all(1, usize::MAX).await.unwrap();
    assert_eq!(positions(&log), (1..=total).collect::<Vec<_>>());
    let mut per_stream: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in &log {
        per_stream
            .entry(e.aggregate_id.clone())
            .or_default()
            .push(e.version);
    }
    for (id, versions) in per_stream {
        let n = versions.len() as u64;
        assert_eq!(
            versions,
            (1..=n).collect::<Vec<_>>(),
            "stream {id} in log order"
        );
        let stored = store.read_stream(&stream(&id), 1).await.unwrap();
        let mut last = 0;
        for e in &stored {
            assert!(e.position > last, "positions grow with versions");
            last = e.position;
        }
    }
    let ids: HashSet<Uuid> = log.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len() as u64, total);
    assert!(tail.await.unwrap() <= total);
}

fn snapshot(id: &str, version: u64, state: &str) -> Snapshot {
    Snapshot {
        aggregate_type: "Tested".to_owned(),
        aggregate_id: id.to_owned(),
        version,
        schema_version: 1,
        state: state.to_owned(),
        taken_at: at(version as i64),
    }
}

/// A snapshot replaces an older one; an older one never replaces a newer one that fits
/// its stream.
pub async fn snapshots_keep_the_latest(store: Arc<dyn EventStore>) {
    let s = stream("snap");
    assert!(store.load_snapshot(&s).await.unwrap().is_none());
    store
        .append(&s, ExpectedVersion::NoStream, events(1..=20))
        .await
        .unwrap();
    store
        .save_snapshot(snapshot("snap", 10, r#"{"v":10}"#))
        .await
        .unwrap();
    store
        .save_snapshot(snapshot("snap", 20, r#"{"v":20}"#))
        .await
        .unwrap();
    store
        .save_snapshot(snapshot("snap", 15, r#"{"v":15}"#))
        .await
        .unwrap();
    assert_eq!(
        store.load_snapshot(&s).await.unwrap(),
        Some(snapshot("snap", 20, r#"{"v":20}"#))
    );
    assert!(
        store
            .load_snapshot(&stream("other"))
            .await
            .unwrap()
            .is_none()
    );
}

/// A snapshot ahead of its stream (its version beyond the stream's, `u64::MAX` included)
/// is replaced by the next one saved, even an older one, so a bogus snapshot cannot keep
/// the good ones out for good; one that fits still keeps older ones out.
pub async fn a_snapshot_ahead_of_its_stream_is_replaced(store: Arc<dyn EventStore>) {
    let s = stream("ahead");
    store
        .append(&s, ExpectedVersion::NoStream, events(1..=3))
        .await
        .unwrap();
    // `snapshot` takes its time from the version, which u64::MAX would overflow.
    let at_version = |version: u64, state: &str| Snapshot {
        version,
        ..snapshot("ahead", 1, state)
    };
    let latest = |store: Arc<dyn EventStore>| async move {
        let snapshot = store.load_snapshot(&stream("ahead")).await.unwrap();
        snapshot.map(|s| (s.version, s.state))
    };
    for bogus in [10, u64::MAX, i64::MAX as u64 + 1] {
        store
            .save_snapshot(at_version(bogus, r#"{"bogus":1}"#))
            .await
            .unwrap();
        assert_eq!(
            latest(Arc::clone(&store)).await,
            Some((bogus, r#"{"bogus":1}"#.to_owned())),
            "a store keeps what it is given; the repository decides whether it fits"
        );
        store
            .save_snapshot(at_version(2, r#"{"v":2}"#))
            .await
            .unwrap();
        assert_eq!(
            latest(Arc::clone(&store)).await,
            Some((2, r#"{"v":2}"#.to_owned())),
            "a snapshot at {bogus}, ahead of the stream at 3, is replaced"
        );
    }
    store
        .save_snapshot(at_version(1, r#"{"v":1}"#))
        .await
        .unwrap();
    assert_eq!(
        latest(Arc::clone(&store)).await,
        Some((2, r#"{"v":2}"#.to_owned())),
        "an older snapshot does not replace one that fits"
    );
    store
        .save_snapshot(at_version(u64::MAX, "{}"))
        .await
        .unwrap();
    assert_eq!(
        latest(Arc::clone(&store)).await.map(|(v, _)| v),
        Some(u64::MAX),
        "versions compare as u64: u64::MAX is newer than 2"
    );
}

/// Checkpoints are per subscription and can move.
pub async fn checkpoints_are_saved_and_overwritten(store: Arc<dyn SubscriptionStore>) {
    assert_eq!(store.load_checkpoint("projection").await.unwrap(), None);
    store.save_checkpoint("projection", 5).await.unwrap();
    store.save_checkpoint("mailer", 2).await.unwrap();
    store.save_checkpoint("projection", 9).await.unwrap();
    assert_eq!(store.load_checkpoint("projection").await.unwrap(), Some(9));
    assert_eq!(store.load_checkpoint("mailer").await.unwrap(), Some(2));
}

fn dead_letter(subscription: &str, position: u64) -> NewDeadLetter {
    NewDeadLetter {
        subscription: subscription.to_owned(),
        event_id: Uuid::now_v7(),
        position,
        event_type: "Counted".to_owned(),
        error: format!("boom at {position}"),
        attempts: 3,
        first_failed_at: at(1),
        last_failed_at: at(2),
    }
}

/// Dead letters get ids, list oldest first, filter by subscription, and can be removed.
pub async fn dead_letters_are_listed_filtered_and_removed(store: Arc<dyn SubscriptionStore>) {
    let a = store
        .add_dead_letter(dead_letter("mailer", 1))
        .await
        .unwrap();
    let b = store
        .add_dead_letter(dead_letter("audit", 2))
        .await
        .unwrap();
    let c = store
        .add_dead_letter(dead_letter("mailer", 3))
        .await
        .unwrap();
    assert!(a != b && b != c && a != c);
    let all = store.dead_letters(None).await.unwrap();
    assert_eq!(
        all.iter().map(|d| d.position).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(all[0].error, "boom at 1");
    assert_eq!(
        (
            all[0].attempts,
            all[0].first_failed_at,
            all[0].last_failed_at
        ),
        (3, at(1), at(2))
    );
    let mailer = store.dead_letters(Some("mailer")).await.unwrap();
    assert_eq!(mailer.iter().map(|d| d.id).collect::<Vec<_>>(), [a, c]);
    assert!(store.remove_dead_letter(a).await.unwrap());
    assert!(!store.remove_dead_letter(a).await.unwrap());
    assert_eq!(store.dead_letters(Some("mailer")).await.unwrap().len(), 1);
}

fn failure(subscription: &str, attempt: u32) -> FailureRecord {
    FailureRecord {
        subscription: subscription.to_owned(),
        event_id: Uuid::nil(),
        position: 7,
        attempt,
        error: format!("attempt {attempt} failed"),
        duration_micros: 1500,
        failed_at: at(attempt as i64),
    }
}

/// Failure records are kept per subscription and listed newest first.
pub async fn failures_are_recorded_per_subscription(store: Arc<dyn SubscriptionStore>) {
    for attempt in 1..=3 {
        store
            .record_failure(failure("mailer", attempt), DEFAULT_FAILURE_RETENTION)
            .await
            .unwrap();
    }
    let failures = store.failures("mailer", 10).await.unwrap();
    assert_eq!(
        failures.iter().map(|f| f.attempt).collect::<Vec<_>>(),
        [3, 2, 1]
    );
    assert_eq!(failures[0].error, "attempt 3 failed");
    assert_eq!(failures[2].failed_at, at(1));
    assert_eq!(failures[0].duration_micros, 1500);
    let newest = store.failures("mailer", 2).await.unwrap();
    assert_eq!(newest.iter().map(|f| f.attempt).collect::<Vec<_>>(), [3, 2]);
    assert!(store.failures("audit", 10).await.unwrap().is_empty());
}

/// Replay requests for a dead letter (taking its subscription) or a subscription are
/// stored pending, listed oldest first (pending ones per subscription), read by id, and
/// finished once: the first outcome stays. An unknown dead letter and an empty name are
/// refused, storing nothing.
pub async fn replay_requests_are_stored_listed_and_finished_once(
    store: Arc<dyn SubscriptionStore>,
) {
    let letter = store
        .add_dead_letter(dead_letter("mailer", 1))
        .await
        .unwrap();
    let one = store
        .request_replay(ReplayTarget::DeadLetter { id: letter }, at(5))
        .await
        .unwrap();
    assert_eq!(one.len(), 1, "{one:?}");
    let one = one.into_iter().next().unwrap();
    assert_eq!(
        (one.subscription.as_str(), one.dead_letter, one.requested_at),
        ("mailer", Some(letter), at(5))
    );
    assert!(one.is_pending());
    let audit = store
        .request_replay(
            ReplayTarget::Subscription {
                name: "audit".into(),
            },
            at(6),
        )
        .await
        .unwrap();
    let [audit] = <[_; 1]>::try_from(audit).unwrap();
    assert_eq!(
        (audit.subscription.as_str(), audit.dead_letter),
        ("audit", None)
    );
    assert_ne!(audit.id, one.id);
    let mailer_all = store
        .request_replay(
            ReplayTarget::Subscription {
                name: "mailer".into(),
            },
            at(7),
        )
        .await
        .unwrap()
        .remove(0);

    match store
        .request_replay(ReplayTarget::DeadLetter { id: letter + 100 }, at(8))
        .await
    {
        Err(Error::DeadLetterNotFound { id }) => assert_eq!(id, letter + 100),
        other => panic!("expected DeadLetterNotFound, got {other:?}"),
    }
    let empty = ReplayTarget::Subscription {
        name: String::new(),
    };
    assert!(matches!(
        store.request_replay(empty, at(8)).await,
        Err(Error::InvalidSubscriptionName { .. })
    ));

    let ids = |requests: Vec<crate::record::ReplayRequest>| {
        requests.iter().map(|r| r.id).collect::<Vec<_>>()
    };
    assert_eq!(
        ids(store.pending_replay_requests("mailer").await.unwrap()),
        [one.id, mailer_all.id]
    );
    assert_eq!(
        ids(store.replay_requests(None).await.unwrap()),
        [one.id, audit.id, mailer_all.id]
    );
    assert_eq!(
        ids(store.replay_requests(Some("audit")).await.unwrap()),
        [audit.id]
    );
    assert_eq!(
        store.replay_request(one.id).await.unwrap(),
        Some(one.clone())
    );
    assert_eq!(
        store.replay_request(mailer_all.id + 100).await.unwrap(),
        None
    );

    let done = FinishedReplay {
        at: at(9),
        outcome: ReplayOutcome::Done {
            replayed: 1,
            failed: 2,
            held_back: 3,
        },
    };
    assert!(
        store
            .finish_replay_request(one.id, done.clone(), DEFAULT_REPLAY_RETENTION)
            .await
            .unwrap()
    );
    let failed = FinishedReplay {
        at: at(10),
        outcome: ReplayOutcome::Failed {
            reason: "the handler failed again".into(),
        },
    };
    assert!(
        !store
            .finish_replay_request(one.id, failed.clone(), DEFAULT_REPLAY_RETENTION)
            .await
            .unwrap(),
        "a finished request keeps its first outcome"
    );
    assert!(
        !store
            .finish_replay_request(
                mailer_all.id + 100,
                failed.clone(),
                DEFAULT_REPLAY_RETENTION
            )
            .await
            .unwrap()
    );
    assert!(
        store
            .finish_replay_request(audit.id, failed.clone(), DEFAULT_REPLAY_RETENTION)
            .await
            .unwrap()
    );
    let finished = store.replay_request(one.id).await.unwrap().unwrap();
    assert_eq!(finished.finished, Some(done));
    assert_eq!(
        store
            .replay_request(audit.id)
            .await
            .unwrap()
            .unwrap()
            .finished,
        Some(failed)
    );
    assert_eq!(
        ids(store.pending_replay_requests("mailer").await.unwrap()),
        [mailer_all.id]
    );
    assert!(
        store
            .pending_replay_requests("audit")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.replay_requests(None).await.unwrap().len(), 3);
    // The request does not touch the dead letter: replaying it is the bus's work.
    assert_eq!(store.dead_letters(None).await.unwrap().len(), 1);
}

/// A request to replay everything is one pending request per subscription that has dead
/// letters when it is stored, in the order of their names; none when there are none.
pub async fn replay_requests_for_everything_follow_the_dead_letters(
    store: Arc<dyn SubscriptionStore>,
) {
    assert!(
        store
            .request_replay(ReplayTarget::All, at(1))
            .await
            .unwrap()
            .is_empty()
    );
    for (subscription, position) in [("mailer", 1), ("audit", 2), ("mailer", 3)] {
        store
            .add_dead_letter(dead_letter(subscription, position))
            .await
            .unwrap();
    }
    let all = store
        .request_replay(ReplayTarget::All, at(2))
        .await
        .unwrap();
    assert_eq!(
        all.iter()
            .map(|r| (r.subscription.as_str(), r.dead_letter, r.requested_at))
            .collect::<Vec<_>>(),
        [("audit", None, at(2)), ("mailer", None, at(2))]
    );
    assert!(all.iter().all(|r| r.is_pending()));
    assert_eq!(store.replay_requests(None).await.unwrap(), all);
}

/// Each recorded outcome removes the finished requests beyond the newest `retain`; pending
/// requests stay, however many.
pub async fn finished_replay_requests_beyond_the_retention_are_removed(
    store: Arc<dyn SubscriptionStore>,
) {
    let mut ids = Vec::new();
    for n in 0..6 {
        let target = ReplayTarget::Subscription {
            name: "mailer".into(),
        };
        ids.push(store.request_replay(target, at(n)).await.unwrap()[0].id);
    }
    let finished = |n| FinishedReplay {
        at: at(100 + n),
        outcome: ReplayOutcome::Failed {
            reason: format!("attempt {n}"),
        },
    };
    for (n, &id) in ids[..4].iter().enumerate() {
        assert!(
            store
                .finish_replay_request(id, finished(n as i64), 2)
                .await
                .unwrap()
        );
    }
    let kept: Vec<u64> = store
        .replay_requests(None)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(kept, [ids[2], ids[3], ids[4], ids[5]]);
    assert_eq!(
        store.pending_replay_requests("mailer").await.unwrap().len(),
        2
    );
    // A smaller retention takes effect at the next outcome; `retain` keeps at least it.
    assert!(
        store
            .finish_replay_request(ids[4], finished(4), 0)
            .await
            .unwrap()
    );
    let kept: Vec<u64> = store
        .replay_requests(None)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(kept, [ids[4], ids[5]]);
}

/// Dead-lettering an event a subscription has dead-lettered already (as a bus does again
/// after a crash) updates that dead letter: same id, the new error and last failure time,
/// the attempts added up, the first failure time kept. Another subscription's dead letter
/// of the same event is its own.
pub async fn one_dead_letter_per_subscription_and_event(store: Arc<dyn EventStore>) {
    let first = dead_letter("mailer", 4);
    let id = store.add_dead_letter(first.clone()).await.unwrap();
    let again = NewDeadLetter {
        error: "boom again".to_owned(),
        attempts: 2,
        first_failed_at: at(10),
        last_failed_at: at(11),
        ..first.clone()
    };
    assert_eq!(store.add_dead_letter(again).await.unwrap(), id);
    let audit = NewDeadLetter {
        subscription: "audit".to_owned(),
        ..first.clone()
    };
    let audit_id = store.add_dead_letter(audit).await.unwrap();
    assert_ne!(audit_id, id);

    let mailer = store.dead_letters(Some("mailer")).await.unwrap();
    assert_eq!(mailer.len(), 1, "{mailer:?}");
    let letter = &mailer[0];
    assert_eq!(
        (letter.id, letter.event_id, letter.position),
        (id, first.event_id, 4)
    );
    assert_eq!(letter.error, "boom again");
    assert_eq!(
        (
            letter.attempts,
            letter.first_failed_at,
            letter.last_failed_at
        ),
        (5, at(1), at(11))
    );
    assert_eq!(store.dead_letters(None).await.unwrap().len(), 2);
    assert_eq!(store.statistics().await.unwrap().dead_letters, 2);

    // Rows whose id could not be read are dead-lettered with the nil id: one letter per
    // position, never merged.
    let unreadable = |position| NewDeadLetter {
        event_id: Uuid::nil(),
        position,
        ..first.clone()
    };
    let nil_a = store.add_dead_letter(unreadable(7)).await.unwrap();
    let nil_b = store.add_dead_letter(unreadable(9)).await.unwrap();
    assert_ne!(nil_a, nil_b);
    assert_eq!(store.add_dead_letter(unreadable(9)).await.unwrap(), nil_b);
    assert!(store.remove_dead_letter(nil_a).await.unwrap());
    assert!(store.remove_dead_letter(nil_b).await.unwrap());

    // Once removed, the event can be dead-lettered anew, under a new id.
    assert!(store.remove_dead_letter(id).await.unwrap());
    let anew = store.add_dead_letter(first).await.unwrap();
    assert!(anew != id && anew != audit_id);
    assert_eq!(
        store.dead_letters(Some("mailer")).await.unwrap()[0].attempts,
        3
    );
}

/// Each failure record removes its subscription's records beyond the newest `retain`;
/// other subscriptions keep theirs.
pub async fn failure_records_beyond_the_retention_are_removed(store: Arc<dyn EventStore>) {
    for attempt in 1..=4 {
        store
            .record_failure(failure("audit", attempt), 10)
            .await
            .unwrap();
    }
    for attempt in 1..=20 {
        store
            .record_failure(failure("mailer", attempt), 5)
            .await
            .unwrap();
    }
    let mailer = store.failures("mailer", 100).await.unwrap();
    assert_eq!(
        mailer.iter().map(|f| f.attempt).collect::<Vec<_>>(),
        [20, 19, 18, 17, 16]
    );
    assert_eq!(store.failures("audit", 100).await.unwrap().len(), 4);
    assert_eq!(store.statistics().await.unwrap().failures, 9);
    // A smaller retention takes effect at the next record.
    store.record_failure(failure("audit", 5), 2).await.unwrap();
    let audit = store.failures("audit", 100).await.unwrap();
    assert_eq!(audit.iter().map(|f| f.attempt).collect::<Vec<_>>(), [5, 4]);
}

/// `clear_dead_letters` and `clear_failures` remove one subscription's records, or all,
/// and say how many they removed.
pub async fn bulk_clears_remove_dead_letters_and_failures(store: Arc<dyn EventStore>) {
    for (subscription, position) in [("mailer", 1), ("mailer", 2), ("audit", 3)] {
        store
            .add_dead_letter(dead_letter(subscription, position))
            .await
            .unwrap();
    }
    for (subscription, attempt) in [("mailer", 1), ("audit", 1), ("audit", 2), ("audit", 3)] {
        store
            .record_failure(failure(subscription, attempt), DEFAULT_FAILURE_RETENTION)
            .await
            .unwrap();
    }
    assert_eq!(store.clear_dead_letters(Some("mailer")).await.unwrap(), 2);
    assert_eq!(store.clear_dead_letters(Some("mailer")).await.unwrap(), 0);
    let left = store.dead_letters(None).await.unwrap();
    assert_eq!(left.iter().map(|d| d.position).collect::<Vec<_>>(), [3]);
    assert_eq!(store.clear_failures(Some("audit")).await.unwrap(), 3);
    assert!(store.failures("audit", 10).await.unwrap().is_empty());
    assert_eq!(store.failures("mailer", 10).await.unwrap().len(), 1);

    assert_eq!(store.clear_dead_letters(None).await.unwrap(), 1);
    assert_eq!(store.clear_failures(None).await.unwrap(), 1);
    let stats = store.statistics().await.unwrap();
    assert_eq!((stats.dead_letters, stats.failures), (0, 0));
    // A cleared dead letter's event can be dead-lettered again.
    store
        .add_dead_letter(dead_letter("mailer", 1))
        .await
        .unwrap();
    assert_eq!(store.dead_letters(None).await.unwrap().len(), 1);
}

/// Statistics count events by type, aggregates, the log's ends, checkpoints with lag,
/// dead letters and snapshots.
pub async fn statistics_describe_the_store(store: Arc<dyn EventStore>) {
    let empty = store.statistics().await.unwrap();
    assert_eq!(
        (empty.events, empty.aggregates, empty.last_position),
        (0, 0, None)
    );
    let mut other = event(9);
    other.event_type = "Other".to_owned();
    store
        .append(&stream("x"), ExpectedVersion::Any, events(1..=3))
        .await
        .unwrap();
    store
        .append(&stream("y"), ExpectedVersion::Any, vec![other])
        .await
        .unwrap();
    store.save_checkpoint("projection", 1).await.unwrap();
    store
        .add_dead_letter(dead_letter("projection", 1))
        .await
        .unwrap();
    store.save_snapshot(snapshot("x", 3, "{}")).await.unwrap();
    let stats = store.statistics().await.unwrap();
    assert_eq!(stats.events, 4);
    assert_eq!(stats.events_by_type.get("Counted"), Some(&3));
    assert_eq!(stats.events_by_type.get("Other"), Some(&1));
    assert_eq!(stats.aggregates, 2);
    assert_eq!(
        (stats.first_position, stats.last_position),
        (Some(1), Some(4))
    );
    assert!(stats.first_recorded_at <= stats.last_recorded_at);
    assert_eq!(stats.checkpoints.len(), 1);
    assert_eq!(
        (stats.checkpoints[0].position, stats.checkpoints[0].lag),
        (1, 3)
    );
    assert_eq!(stats.dead_letters, 1);
    assert_eq!(stats.snapshots, 1);
}

/// Expands to one `#[test]` per case of the [`LeaseStore`] contract (segment leases,
/// fencing, members, reset), each on a fresh store from `$factory`, like
/// [`store_conformance_tests!`](crate::store_conformance_tests) (with the same
/// `skip_if = path` form). The cases wait for short leases (200 ms) to expire by polling
/// the store, never by sleeping a fixed time before an assertion.
#[macro_export]
macro_rules! lease_conformance_tests {
    ($factory:path) => {
        $crate::lease_conformance_tests!(
            $factory,
            skip_if = $crate::testing::conformance::never_skip
        );
    };
    ($factory:path, skip_if = $skip:path) => {
        $crate::store_conformance_tests!(@cases $factory, $skip;
            leases_are_claimed_once_and_fence_checkpoints,
            expired_leases_are_taken_over_with_a_higher_epoch,
            racing_claims_never_share_a_segment,
            renewals_extend_held_leases_and_skip_lost_ones,
            a_released_segment_is_claimed_by_another_member,
            another_segment_count_is_refused,
            invalid_segment_counts_and_ttls_are_refused,
            members_heartbeat_expire_and_leave,
            reset_is_refused_on_a_live_lease_and_changes_the_count,
            segment_states_list_owners_epochs_and_checkpoints,
            one_segment_uses_the_plain_checkpoint,
        );
    };
}

/// A lease time long enough that no case sees it expire.
const LONG: std::time::Duration = std::time::Duration::from_secs(60);

/// A lease time cases wait out.
const SHORT: std::time::Duration = std::time::Duration::from_millis(200);

/// How long a case waits for a short lease to expire before it fails.
const EXPIRY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(20);

fn segments_of(leases: &[SegmentLease]) -> Vec<u32> {
    leases.iter().map(|l| l.segment).collect()
}

#[track_caller]
fn assert_lost(result: crate::Result<()>, lease: &SegmentLease) {
    match result {
        Err(Error::LeaseLost {
            subscription,
            segment,
            epoch,
        }) => {
            assert_eq!(
                (subscription.as_str(), segment, epoch),
                (lease.subscription.as_str(), lease.segment, lease.epoch),
                "the refusal names the lost lease"
            );
        }
        other => panic!("expected LeaseLost, got {other:?}"),
    }
}

/// Claims for `member` until it holds `want` segments in all (expired leases of others
/// becoming free), polling the store; fails after [`EXPIRY_DEADLINE`].
async fn claim_until(
    store: &dyn LeaseStore,
    subscription: &str,
    member: &str,
    segments: u32,
    want: usize,
) -> Vec<SegmentLease> {
    let deadline = tokio::time::Instant::now() + EXPIRY_DEADLINE;
    let mut held = Vec::new();
    loop {
        let taken = store
            .claim_segments(subscription, member, segments, segments, LONG)
            .await
            .expect("claim");
        held.extend(taken);
        if held.len() >= want {
            held.sort_by_key(|l: &SegmentLease| l.segment);
            return held;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{member} holds {} of {want} segments of {subscription} after {EXPIRY_DEADLINE:?}",
            held.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Claims hand out free segments lowest first with epoch 1; a second member gets none of
/// them; a save moves the segment's checkpoint forward only; a lease lost to a takeover
/// cannot save and leaves the checkpoint as it was.
pub async fn leases_are_claimed_once_and_fence_checkpoints(store: Arc<dyn EventStore>) {
    let a = store
        .claim_segments("fenced", "a", 4, 3, LONG)
        .await
        .unwrap();
    assert_eq!(segments_of(&a), [0, 1, 2]);
    for lease in &a {
        assert_eq!(
            (
                lease.subscription.as_str(),
                lease.segments,
                lease.owner.as_str(),
                lease.epoch,
                lease.checkpoint
            ),
            ("fenced", 4, "a", 1, 0)
        );
    }
    // One claim, one expiry (the store's clock, which the case does not compare with its own).
    assert!(a.iter().all(|l| l.expires_at == a[0].expires_at), "{a:?}");
    let again = store
        .claim_segments("fenced", "a", 4, 4, LONG)
        .await
        .unwrap();
    assert_eq!(
        segments_of(&again),
        [3],
        "segments a holds are not returned"
    );
    let b = store
        .claim_segments("fenced", "b", 4, 4, LONG)
        .await
        .unwrap();
    assert!(b.is_empty(), "every segment is held: {b:?}");

    store.save_segment_checkpoint(&a[0], 10).await.unwrap();
    store.save_segment_checkpoint(&a[0], 5).await.unwrap();
    assert_eq!(
        store.load_checkpoint("fenced#0/4").await.unwrap(),
        Some(10),
        "a checkpoint never moves backwards"
    );

    store.release_leases(&a[..1]).await.unwrap();
    let b = store
        .claim_segments("fenced", "b", 4, 4, LONG)
        .await
        .unwrap();
    assert_eq!(segments_of(&b), [0]);
    assert_eq!((b[0].epoch, b[0].checkpoint), (2, 10));
    assert_lost(store.save_segment_checkpoint(&a[0], 99).await, &a[0]);
    assert_eq!(store.load_checkpoint("fenced#0/4").await.unwrap(), Some(10));
    store.save_segment_checkpoint(&b[0], 20).await.unwrap();
    assert_eq!(store.load_checkpoint("fenced#0/4").await.unwrap(), Some(20));
}

/// A lease not renewed expires; another member then takes the segment with epoch + 1, and
/// the first one can neither renew nor save. An expired lease nobody took over still
/// renews.
pub async fn expired_leases_are_taken_over_with_a_higher_epoch(store: Arc<dyn EventStore>) {
    let a = store
        .claim_segments("expiring", "a", 2, 2, SHORT)
        .await
        .unwrap();
    assert_eq!(segments_of(&a), [0, 1]);
    store.save_segment_checkpoint(&a[1], 7).await.unwrap();
    let b = claim_until(&*store, "expiring", "b", 2, 2).await;
    assert_eq!(segments_of(&b), [0, 1]);
    assert!(b.iter().all(|l| l.epoch == 2 && l.owner == "b"), "{b:?}");
    assert_eq!((b[0].checkpoint, b[1].checkpoint), (0, 7));
    assert!(store.renew_leases(&a, LONG).await.unwrap().is_empty());
    assert_lost(store.save_segment_checkpoint(&a[1], 8).await, &a[1]);
    assert_eq!(
        store.load_checkpoint("expiring#1/2").await.unwrap(),
        Some(7)
    );

    // Expired but not taken over: still held by its owner.
    let c = store
        .claim_segments("lapsed", "c", 1, 1, SHORT)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + EXPIRY_DEADLINE;
    while store.segment_states("lapsed").await.unwrap()[0]
        .owner
        .is_some()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease never expired"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let renewed = store.renew_leases(&c, LONG).await.unwrap();
    assert_eq!(renewed.len(), 1);
    assert_eq!(renewed[0].epoch, c[0].epoch);
    assert!(renewed[0].expires_at > c[0].expires_at);
    store.save_segment_checkpoint(&renewed[0], 3).await.unwrap();
    let states = store.segment_states("lapsed").await.unwrap();
    assert_eq!(states[0].owner.as_deref(), Some("c"));
}

/// Many members claiming all segments at once never both get one: every segment goes to
/// exactly one of them.
pub async fn racing_claims_never_share_a_segment(store: Arc<dyn EventStore>) {
    for round in 0..4 {
        let subscription = format!("raced-{round}");
        let start = Arc::new(tokio::sync::Barrier::new(8));
        let claims = (0..8)
            .map(|m| {
                let store = Arc::clone(&store);
                let start = Arc::clone(&start);
                let subscription = subscription.clone();
                tokio::spawn(async move {
                    start.wait().await;
                    let mut mine = Vec::new();
                    // Several smaller claims each, so the members interleave.
                    for _ in 0..4 {
                        mine.extend(
                            store
                                .claim_segments(&subscription, &format!("m{m}"), 16, 2, LONG)
                                .await
                                .unwrap(),
                        );
                    }
                    mine
                })
            })
            .collect::<Vec<_>>();
        let mut owners: BTreeMap<u32, String> = BTreeMap::new();
        for claim in claims {
            for lease in claim.await.unwrap() {
                assert_eq!(lease.epoch, 1);
                if let Some(other) = owners.insert(lease.segment, lease.owner.clone()) {
                    panic!(
                        "segment {} went to {other} and to {}",
                        lease.segment, lease.owner
                    );
                }
            }
        }
        assert_eq!(owners.len(), 16, "all 16 segments are claimed: {owners:?}");
        let states = store.segment_states(&subscription).await.unwrap();
        for state in states {
            assert_eq!(state.owner.as_ref(), owners.get(&state.segment));
        }
    }
}

/// Renewing extends the leases still held and returns them with the new expiry; a lease
/// taken over since is absent from the answer, the others are renewed.
pub async fn renewals_extend_held_leases_and_skip_lost_ones(store: Arc<dyn EventStore>) {
    let a = store
        .claim_segments("renewed", "a", 3, 3, std::time::Duration::from_secs(30))
        .await
        .unwrap();
    let renewed = store.renew_leases(&a, LONG).await.unwrap();
    assert_eq!(segments_of(&renewed), [0, 1, 2]);
    for (old, new) in a.iter().zip(&renewed) {
        assert!(new.expires_at > old.expires_at);
        assert_eq!(
            SegmentLease {
                expires_at: old.expires_at,
                ..new.clone()
            },
            *old,
            "only the expiry changes"
        );
    }
    let states = store.segment_states("renewed").await.unwrap();
    assert_eq!(states[2].expires_at, Some(renewed[2].expires_at));

    store.release_leases(&renewed[1..2]).await.unwrap();
    let b = store
        .claim_segments("renewed", "b", 3, 3, LONG)
        .await
        .unwrap();
    assert_eq!(segments_of(&b), [1]);
    let again = store.renew_leases(&renewed, LONG).await.unwrap();
    assert_eq!(segments_of(&again), [0, 2], "the lease b took over is lost");
    assert_eq!(
        segments_of(&store.renew_leases(&b, LONG).await.unwrap()),
        [1]
    );
}

/// A released segment is free at once: another member claims it with the next epoch; a
/// release of a lease no longer held changes nothing.
pub async fn a_released_segment_is_claimed_by_another_member(store: Arc<dyn EventStore>) {
    let a = store
        .claim_segments("released", "a", 2, 2, LONG)
        .await
        .unwrap();
    store.release_leases(&a).await.unwrap();
    let states = store.segment_states("released").await.unwrap();
    assert!(
        states
            .iter()
            .all(|s| s.owner.is_none() && s.expires_at.is_none())
    );
    let b = store
        .claim_segments("released", "b", 2, 1, LONG)
        .await
        .unwrap();
    assert_eq!((segments_of(&b), b[0].epoch), (vec![0], 2));
    // a's old lease on segment 0 is not b's: releasing it again leaves b's.
    store.release_leases(&a).await.unwrap();
    let states = store.segment_states("released").await.unwrap();
    assert_eq!(states[0].owner.as_deref(), Some("b"));
    assert_eq!(
        segments_of(&store.renew_leases(&b, LONG).await.unwrap()),
        [0]
    );
}

/// A claim with another count than the stored one fails and claims nothing.
pub async fn another_segment_count_is_refused(store: Arc<dyn EventStore>) {
    store
        .claim_segments("counted", "a", 4, 1, LONG)
        .await
        .unwrap();
    match store.claim_segments("counted", "b", 8, 8, LONG).await {
        Err(Error::SegmentCountMismatch {
            subscription,
            stored,
            requested,
        }) => assert_eq!(
            (subscription.as_str(), stored, requested),
            ("counted", 4, 8)
        ),
        other => panic!("expected SegmentCountMismatch, got {other:?}"),
    }
    let states = store.segment_states("counted").await.unwrap();
    assert_eq!(states.len(), 4);
    assert_eq!(
        states.iter().filter(|s| s.owner.is_some()).count(),
        1,
        "the refused claim took nothing"
    );
}

/// Counts of 0 and above `MAX_SEGMENTS`, and lease times of zero or above `MAX_LEASE_TTL`,
/// are refused with typed errors and store nothing.
pub async fn invalid_segment_counts_and_ttls_are_refused(store: Arc<dyn EventStore>) {
    for segments in [0, MAX_SEGMENTS + 1, u32::MAX] {
        match store
            .claim_segments("invalid", "a", segments, 1, LONG)
            .await
        {
            Err(Error::InvalidSegments { segments: s }) => assert_eq!(s, segments),
            other => panic!("expected InvalidSegments for {segments}, got {other:?}"),
        }
    }
    for ttl in [
        std::time::Duration::ZERO,
        MAX_LEASE_TTL + std::time::Duration::from_secs(1),
    ] {
        assert!(matches!(
            store.claim_segments("invalid", "a", 2, 1, ttl).await,
            Err(Error::InvalidLeaseTtl { .. })
        ));
        assert!(matches!(
            store.heartbeat("invalid", "a", ttl).await,
            Err(Error::InvalidLeaseTtl { .. })
        ));
    }
    assert!(store.segment_states("invalid").await.unwrap().is_empty());
    let most = store
        .claim_segments("most", "a", MAX_SEGMENTS, 2, LONG)
        .await
        .unwrap();
    assert_eq!(segments_of(&most), [0, 1]);
    let states = store.segment_states("most").await.unwrap();
    assert_eq!(states.len(), MAX_SEGMENTS as usize);
    assert_eq!(states[1023].segment, 1023);
}

/// A heartbeat answers the live members, sorted, itself included; a member whose
/// membership expired drops out; one that leaves drops out at once and its leases are
/// released.
pub async fn members_heartbeat_expire_and_leave(store: Arc<dyn EventStore>) {
    assert_eq!(store.heartbeat("team", "b", LONG).await.unwrap(), ["b"]);
    assert_eq!(
        store.heartbeat("team", "a", LONG).await.unwrap(),
        ["a", "b"]
    );
    assert_eq!(
        store.heartbeat("team", "c", SHORT).await.unwrap(),
        ["a", "b", "c"]
    );
    assert_eq!(
        store.heartbeat("other", "z", LONG).await.unwrap(),
        ["z"],
        "members are per subscription"
    );
    let deadline = tokio::time::Instant::now() + EXPIRY_DEADLINE;
    loop {
        let members = store.heartbeat("team", "a", LONG).await.unwrap();
        if members == ["a", "b"] {
            break;
        }
        assert_eq!(members, ["a", "b", "c"]);
        assert!(tokio::time::Instant::now() < deadline, "c never expired");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let held = store.claim_segments("team", "b", 3, 2, LONG).await.unwrap();
    assert_eq!(segments_of(&held), [0, 1]);
    store.leave("team", "b").await.unwrap();
    assert_eq!(store.heartbeat("team", "a", LONG).await.unwrap(), ["a"]);
    assert!(store.renew_leases(&held, LONG).await.unwrap().is_empty());
    let taken = store.claim_segments("team", "a", 3, 3, LONG).await.unwrap();
    assert_eq!(segments_of(&taken), [0, 1, 2]);
    assert_eq!((taken[0].epoch, taken[2].epoch), (2, 1));
    // Leaving without being a member is fine.
    store.leave("team", "nobody").await.unwrap();
}

/// A reset is refused while a lease is live; once released it sets the checkpoint, forgets
/// the count so another may be claimed, and old leases stay lost (epochs keep rising).
pub async fn reset_is_refused_on_a_live_lease_and_changes_the_count(store: Arc<dyn EventStore>) {
    let a = store
        .claim_segments("rebuilt", "a", 2, 2, LONG)
        .await
        .unwrap();
    store.save_segment_checkpoint(&a[0], 5).await.unwrap();
    store.save_segment_checkpoint(&a[1], 6).await.unwrap();
    match store.reset_segments("rebuilt", 0).await {
        Err(Error::SubscriptionRunning { name }) => assert_eq!(name, "rebuilt"),
        other => panic!("expected SubscriptionRunning, got {other:?}"),
    }
    assert_eq!(store.load_checkpoint("rebuilt#0/2").await.unwrap(), Some(5));

    store.release_leases(&a).await.unwrap();
    store.reset_segments("rebuilt", 3).await.unwrap();
    assert!(store.segment_states("rebuilt").await.unwrap().is_empty());
    assert_eq!(store.load_checkpoint("rebuilt#0/2").await.unwrap(), None);
    assert_eq!(store.load_checkpoint("rebuilt#1/2").await.unwrap(), None);
    assert_eq!(store.load_checkpoint("rebuilt").await.unwrap(), Some(3));

    let b = store
        .claim_segments("rebuilt", "b", 4, 4, LONG)
        .await
        .unwrap();
    assert_eq!(segments_of(&b), [0, 1, 2, 3]);
    assert!(b.iter().all(|l| l.checkpoint == 3), "{b:?}");
    assert!(b.iter().all(|l| l.epoch > a[0].epoch), "{b:?}");
    assert_lost(store.save_segment_checkpoint(&a[0], 9).await, &a[0]);

    // A reset of a subscription never leased sets its plain checkpoint.
    store.reset_segments("fresh", 4).await.unwrap();
    assert_eq!(store.load_checkpoint("fresh").await.unwrap(), Some(4));
    let c = store
        .claim_segments("fresh", "c", 1, 1, LONG)
        .await
        .unwrap();
    assert_eq!(c[0].checkpoint, 4);
}

/// Segment states list every segment by number: its live owner (none when free), epoch,
/// expiry and checkpoint; a subscription never leased has none.
pub async fn segment_states_list_owners_epochs_and_checkpoints(store: Arc<dyn EventStore>) {
    assert!(store.segment_states("listed").await.unwrap().is_empty());
    let a = store
        .claim_segments("listed", "a", 3, 2, LONG)
        .await
        .unwrap();
    store.save_segment_checkpoint(&a[1], 42).await.unwrap();
    let states = store.segment_states("listed").await.unwrap();
    assert_eq!(
        states,
        [
            SegmentState {
                segment: 0,
                segments: 3,
                owner: Some("a".into()),
                epoch: 1,
                expires_at: Some(a[0].expires_at),
                checkpoint: 0,
            },
            SegmentState {
                segment: 1,
                segments: 3,
                owner: Some("a".into()),
                epoch: 1,
                expires_at: Some(a[1].expires_at),
                checkpoint: 42,
            },
            SegmentState {
                segment: 2,
                segments: 3,
                owner: None,
                epoch: 0,
                expires_at: None,
                checkpoint: 0,
            },
        ]
    );
}

/// With one segment the checkpoint is the subscription's plain one: a claim starts from
/// it and a save is what `load_checkpoint` reads. With more, each segment starts from the
/// plain checkpoint when the count is first stored.
pub async fn one_segment_uses_the_plain_checkpoint(store: Arc<dyn EventStore>) {
    store.save_checkpoint("single", 7).await.unwrap();
    let a = store
        .claim_segments("single", "a", 1, 1, LONG)
        .await
        .unwrap();
    assert_eq!((a[0].segment, a[0].checkpoint), (0, 7));
    assert_eq!(a[0].checkpoint_name(), "single");
    store.save_segment_checkpoint(&a[0], 9).await.unwrap();
    assert_eq!(store.load_checkpoint("single").await.unwrap(), Some(9));

    store.save_checkpoint("split", 11).await.unwrap();
    let b = store
        .claim_segments("split", "b", 4, 4, LONG)
        .await
        .unwrap();
    assert!(b.iter().all(|l| l.checkpoint == 11), "{b:?}");
    assert_eq!(store.load_checkpoint("split#2/4").await.unwrap(), Some(11));
}
