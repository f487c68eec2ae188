//! Every event a user stores reads back identical, bit for bit, on every store and through
//! every read path, or its append fails with a typed error naming the event (issue 9,
//! point 1).
//!
//! Property tests store derived events (enum and struct forms) holding floats (subnormals,
//! -0.0, extremes, computed prices), integers at their limits, unicode and empty strings,
//! empty collections and options, with unicode metadata, through `Repository` (which uses
//! `NewEvent::from_event`), and read them back with `read_stream`, `read_all`, `get`,
//! `Repository::load` by replay and from a snapshot. Floats are compared by `to_bits`, so
//! `-0.0` against `0.0` or one ULP off fails.
//!
//! 128-bit integers: serde_json writes and reads them exactly in a payload of the current
//! schema version. An upcast payload passes through `serde_json::Value`, which holds no
//! integer beyond 64 bits; that path is not covered here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use eventfold::prelude::*;
use eventfold::{CommandError, Error, NewEvent, SqliteEventStore, SqliteOptions};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Exact")]
enum ExactEvent {
    Floats {
        a: f64,
        b: f32,
        list: Vec<f64>,
        maybe: Option<f64>,
        by_name: BTreeMap<String, f32>,
    },
    Ints {
        i: i64,
        u: u64,
        small: i8,
        wide: i128,
        uwide: u128,
        maybe: Option<u32>,
    },
    Texts {
        text: String,
        list: Vec<String>,
        map: BTreeMap<String, String>,
        letter: char,
        maybe: Option<String>,
    },
    Nested(Inner),
    Nothing,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Inner {
    price: f64,
    legs: Vec<(f32, i64)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "ExactStruct", name = "ExactFilled")]
struct ExactFilled {
    price: f64,
    qty: f32,
    id: u64,
    delta: i64,
    note: String,
    tags: Vec<String>,
    fees: BTreeMap<String, f64>,
    parent: Option<Inner>,
}

/// The bits of every float in a value, in order: equal values with equal bits are stored
/// exactly (`PartialEq` alone takes `-0.0` for `0.0`).
trait FloatBits {
    fn float_bits(&self, out: &mut Vec<u64>);
}

impl FloatBits for Inner {
    fn float_bits(&self, out: &mut Vec<u64>) {
        out.push(self.price.to_bits());
        out.extend(self.legs.iter().map(|(f, _)| u64::from(f.to_bits())));
    }
}

impl FloatBits for ExactEvent {
    fn float_bits(&self, out: &mut Vec<u64>) {
        match self {
            ExactEvent::Floats {
                a,
                b,
                list,
                maybe,
                by_name,
            } => {
                out.push(a.to_bits());
                out.push(u64::from(b.to_bits()));
                out.extend(list.iter().map(|f| f.to_bits()));
                out.extend(maybe.map(f64::to_bits));
                out.extend(by_name.values().map(|f| u64::from(f.to_bits())));
            }
            ExactEvent::Nested(inner) => inner.float_bits(out),
            ExactEvent::Ints { .. } | ExactEvent::Texts { .. } | ExactEvent::Nothing => {}
        }
    }
}

impl FloatBits for ExactFilled {
    fn float_bits(&self, out: &mut Vec<u64>) {
        out.push(self.price.to_bits());
        out.push(u64::from(self.qty.to_bits()));
        out.extend(self.fees.values().map(|f| f.to_bits()));
        if let Some(parent) = &self.parent {
            parent.float_bits(out);
        }
    }
}

fn bits<E: FloatBits>(events: &[E]) -> Vec<u64> {
    let mut out = Vec::new();
    for e in events {
        e.float_bits(&mut out);
    }
    out
}

/// An aggregate that keeps every event it is given, so a load hands back what was stored;
/// its command is the events to store.
#[derive(Debug, Serialize, Deserialize)]
struct Collected<E> {
    events: Vec<E>,
}

impl<E> Default for Collected<E> {
    fn default() -> Self {
        Collected { events: Vec::new() }
    }
}

impl Aggregate for Collected<ExactEvent> {
    const TYPE: &'static str = "Exact";
    type Event = ExactEvent;
    type Command = Vec<ExactEvent>;
    type Error = std::convert::Infallible;
    fn apply(&mut self, event: &ExactEvent) {
        self.events.push(event.clone());
    }
    fn handle(&self, command: Vec<ExactEvent>) -> Result<Vec<ExactEvent>, Self::Error> {
        Ok(command)
    }
}

impl Aggregate for Collected<ExactFilled> {
    const TYPE: &'static str = "ExactStruct";
    type Event = ExactFilled;
    type Command = Vec<ExactFilled>;
    type Error = std::convert::Infallible;
    fn apply(&mut self, event: &ExactFilled) {
        self.events.push(event.clone());
    }
    fn handle(&self, command: Vec<ExactFilled>) -> Result<Vec<ExactFilled>, Self::Error> {
        Ok(command)
    }
}

// ---- strategies ----

fn finite_f64() -> impl Strategy<Value = f64> {
    use proptest::num::f64 as f;
    prop_oneof![
        4 => f::POSITIVE | f::NEGATIVE | f::NORMAL | f::SUBNORMAL | f::ZERO,
        // Computed prices: the values that came back one ULP off.
        2 => (0_u64..10_000_000, 1_u32..7).prop_map(|(n, d)| n as f64 * 0.01 / f64::from(d)),
        1 => (1_u64..(1 << 52)).prop_map(f64::from_bits),
        1 => prop::sample::select(vec![
            0.0, -0.0, f64::MIN, f64::MAX, f64::MIN_POSITIVE, -f64::MIN_POSITIVE,
            f64::from_bits(1), -f64::from_bits(1), f64::EPSILON, 0.1, 0.2 + 0.1,
            9007199254740993.0, 1e308, 1e-308,
        ]),
    ]
}

fn finite_f32() -> impl Strategy<Value = f32> {
    use proptest::num::f32 as f;
    prop_oneof![
        4 => f::POSITIVE | f::NEGATIVE | f::NORMAL | f::SUBNORMAL | f::ZERO,
        1 => (1_u32..(1 << 23)).prop_map(f32::from_bits),
        1 => prop::sample::select(vec![
            0.0, -0.0, f32::MIN, f32::MAX, f32::MIN_POSITIVE, f32::from_bits(1), 0.1,
            16777217.0,
        ]),
    ]
}

/// Any text: every plane, control characters and NUL included, often empty.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just(String::new()),
        1 => Just("null".to_owned()),
        6 => prop::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter),
    ]
}

fn i64_any() -> impl Strategy<Value = i64> {
    prop_oneof![
        prop::sample::select(vec![i64::MIN, i64::MIN + 1, -1, 0, 1, i64::MAX]),
        any::<i64>()
    ]
}

fn u64_any() -> impl Strategy<Value = u64> {
    prop_oneof![
        prop::sample::select(vec![0, 1, u64::from(u32::MAX), i64::MAX as u64, u64::MAX]),
        any::<u64>()
    ]
}

fn i128_any() -> impl Strategy<Value = i128> {
    prop_oneof![
        prop::sample::select(vec![i128::MIN, i128::MAX, i128::from(i64::MIN) - 1, 0]),
        any::<i128>()
    ]
}

fn u128_any() -> impl Strategy<Value = u128> {
    prop_oneof![
        prop::sample::select(vec![u128::MAX, u128::from(u64::MAX) + 1, 0]),
        any::<u128>()
    ]
}

fn inner() -> impl Strategy<Value = Inner> {
    (
        finite_f64(),
        prop::collection::vec((finite_f32(), i64_any()), 0..3),
    )
        .prop_map(|(price, legs)| Inner { price, legs })
}

fn exact_event() -> impl Strategy<Value = ExactEvent> {
    prop_oneof![
        (
            finite_f64(),
            finite_f32(),
            prop::collection::vec(finite_f64(), 0..4),
            prop::option::of(finite_f64()),
            prop::collection::btree_map(text(), finite_f32(), 0..3),
        )
            .prop_map(|(a, b, list, maybe, by_name)| ExactEvent::Floats {
                a,
                b,
                list,
                maybe,
                by_name
            }),
        (
            i64_any(),
            u64_any(),
            any::<i8>(),
            i128_any(),
            u128_any(),
            prop::option::of(any::<u32>()),
        )
            .prop_map(|(i, u, small, wide, uwide, maybe)| ExactEvent::Ints {
                i,
                u,
                small,
                wide,
                uwide,
                maybe
            }),
        (
            text(),
            prop::collection::vec(text(), 0..3),
            prop::collection::btree_map(text(), text(), 0..3),
            any::<char>(),
            prop::option::of(text()),
        )
            .prop_map(|(text, list, map, letter, maybe)| ExactEvent::Texts {
                text,
                list,
                map,
                letter,
                maybe
            }),
        inner().prop_map(ExactEvent::Nested),
        Just(ExactEvent::Nothing),
    ]
}

fn exact_filled() -> impl Strategy<Value = ExactFilled> {
    (
        (finite_f64(), finite_f32(), u64_any(), i64_any()),
        (
            text(),
            prop::collection::vec(text(), 0..3),
            prop::collection::btree_map(text(), finite_f64(), 0..3),
            prop::option::of(inner()),
        ),
    )
        .prop_map(
            |((price, qty, id, delta), (note, tags, fees, parent))| ExactFilled {
                price,
                qty,
                id,
                delta,
                note,
                tags,
                fees,
                parent,
            },
        )
}

fn metadata() -> impl Strategy<Value = Metadata> {
    (
        prop::option::of(any::<u128>()),
        prop::collection::btree_map(text(), text(), 0..4),
    )
        .prop_map(|(correlation, values)| Metadata {
            correlation_id: correlation.map(uuid::Uuid::from_u128),
            causation_id: None,
            values,
        })
}

// ---- the stores and the round trip ----

/// Both stores, each opened once per property; every case writes its own stream.
struct Stores {
    runtime: tokio::runtime::Runtime,
    stores: Vec<(&'static str, Arc<dyn EventStore>)>,
    _dir: tempfile::TempDir,
}

impl Stores {
    fn open() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sqlite = runtime
            .block_on(SqliteEventStore::open(
                dir.path().join("exact.db"),
                SqliteOptions::new(),
            ))
            .unwrap();
        Stores {
            runtime,
            stores: vec![
                ("memory", Arc::new(InMemoryEventStore::new())),
                ("sqlite", Arc::new(sqlite)),
            ],
            _dir: dir,
        }
    }
}

/// A fresh aggregate id per case, itself any text (it is user input too).
fn stream_id(case: u64, suffix: &str) -> String {
    format!("case-{case}-{suffix}")
}

static CASE: AtomicU64 = AtomicU64::new(0);

/// Stores `events` with `metadata` through a repository, then reads them back through
/// every path and checks each is identical to what was stored, floats by their bits.
async fn round_trip<E>(
    store: &Arc<dyn EventStore>,
    id: &str,
    events: Vec<E>,
    metadata: Metadata,
) -> Result<(), TestCaseError>
where
    E: DomainEvent + FloatBits + Clone + PartialEq + std::fmt::Debug,
    Collected<E>: Aggregate<Event = E, Command = Vec<E>> + Serialize + serde::de::DeserializeOwned,
{
    let repo = Repository::<Collected<E>>::new(Arc::clone(store)).snapshot_every(1);
    let committed = repo
        .execute_with(id, events.clone(), metadata.clone())
        .await
        .map_err(|e| TestCaseError::fail(format!("storing failed: {e}")))?;
    prop_assert_eq!(committed.version, events.len() as u64);
    let expected_bits = bits(&events);
    let stream = StreamId::new(<Collected<E> as Aggregate>::TYPE, id);

    let read = store.read_stream(&stream, 1).await.unwrap();
    let positions = committed.positions.clone().unwrap();
    let all = store
        .read_all(*positions.start(), events.len())
        .await
        .unwrap();
    prop_assert_eq!(&read, &all, "read_stream and read_all differ");
    let mut got = Vec::new();
    for recorded in &read {
        prop_assert_eq!(&recorded.metadata, &metadata);
        prop_assert_eq!(recorded.aggregate_id.as_str(), id);
        let by_id = store.get(recorded.event_id).await.unwrap();
        prop_assert_eq!(by_id.as_ref(), Some(recorded), "get differs");
        got.push(recorded.decode::<E>().unwrap());
    }
    prop_assert_eq!(&got, &events, "read_stream decodes to other events");
    prop_assert_eq!(bits(&got), expected_bits.clone(), "float bits differ");

    // From the snapshot the command took, then by full replay.
    let (from_snapshot, version) = repo.load(id).await.unwrap();
    prop_assert_eq!(version, events.len() as u64);
    prop_assert!(
        store.load_snapshot(&stream).await.unwrap().is_some(),
        "a snapshot was taken"
    );
    prop_assert_eq!(&from_snapshot.events, &events, "snapshot differs");
    prop_assert_eq!(bits(&from_snapshot.events), expected_bits.clone());
    let (replayed, _) = Repository::<Collected<E>>::new(Arc::clone(store))
        .load(id)
        .await
        .unwrap();
    prop_assert_eq!(&replayed.events, &events, "replay differs");
    prop_assert_eq!(bits(&replayed.events), expected_bits);
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

#[test]
fn enum_events_read_back_bit_for_bit_on_every_store() {
    let stores = Stores::open();
    proptest!(config(), |(events in prop::collection::vec(exact_event(), 1..4),
                          metadata in metadata(),
                          suffix in text())| {
        let case = CASE.fetch_add(1, Ordering::Relaxed);
        for (name, store) in &stores.stores {
            stores.runtime.block_on(round_trip(
                store,
                &stream_id(case, &suffix),
                events.clone(),
                metadata.clone(),
            )).map_err(|e| TestCaseError::fail(format!("{name}: {e}")))?;
        }
    });
}

#[test]
fn struct_events_read_back_bit_for_bit_on_every_store() {
    let stores = Stores::open();
    proptest!(config(), |(events in prop::collection::vec(exact_filled(), 1..4),
                          metadata in metadata(),
                          suffix in text())| {
        let case = CASE.fetch_add(1, Ordering::Relaxed);
        for (name, store) in &stores.stores {
            stores.runtime.block_on(round_trip(
                store,
                &stream_id(case, &suffix),
                events.clone(),
                metadata.clone(),
            )).map_err(|e| TestCaseError::fail(format!("{name}: {e}")))?;
        }
    });
}

/// The prices that came back one or two ULPs off before serde_json parsed with
/// `float_roundtrip`: a sweep of computed cents, each checked by its bits.
#[test]
fn computed_prices_no_longer_read_back_ulps_off() {
    for cents in 0..20_000_u64 {
        let price = cents as f64 * 0.01 * 1.1;
        let json = serde_json::to_string(&price).unwrap();
        let back: f64 = serde_json::from_str(&json).unwrap();
        assert_eq!(
            back.to_bits(),
            price.to_bits(),
            "{price} came back as {back}"
        );
    }
}

fn non_finite_events() -> Vec<(ExactEvent, &'static str)> {
    let floats = |a: f64, b: f32, list: Vec<f64>, maybe: Option<f64>| ExactEvent::Floats {
        a,
        b,
        list,
        maybe,
        by_name: BTreeMap::new(),
    };
    vec![
        (floats(f64::NAN, 0.0, vec![], None), "`a`"),
        (floats(0.0, f32::INFINITY, vec![], None), "`b`"),
        (
            floats(0.0, 0.0, vec![1.0, f64::NEG_INFINITY], None),
            "`list[1]`",
        ),
        // The one that read back as `None` rather than failing.
        (floats(0.0, 0.0, vec![], Some(f64::NAN)), "`maybe`"),
        (
            ExactEvent::Nested(Inner {
                price: 1.0,
                legs: vec![(f32::NAN, 3)],
            }),
            "legs[0][0]",
        ),
    ]
}

/// A NaN or an infinity used to be stored as `null`, then failed to decode or read back as
/// `None`: now the append is refused with `Error::Serialize` naming the event type, and
/// nothing is stored.
#[test]
fn non_finite_floats_are_refused_not_stored_as_null() {
    let stores = Stores::open();
    for (name, store) in &stores.stores {
        stores.runtime.block_on(async {
            let repo = Repository::<Collected<ExactEvent>>::new(Arc::clone(store));
            for (n, (event, place)) in non_finite_events().into_iter().enumerate() {
                let expected_type = event.event_type();
                match NewEvent::from_event(&event, Metadata::new()) {
                    Err(Error::Serialize { event_type, source }) => {
                        assert_eq!(event_type, expected_type, "{name}");
                        assert!(source.to_string().contains(place), "{name}: {source}");
                    }
                    other => panic!("{name}: {event:?} gave {other:?}"),
                }
                let id = format!("nan-{n}");
                let good = ExactEvent::Nothing;
                match repo.execute(&id, vec![good, event.clone()]).await {
                    Err(CommandError::Store(Error::Serialize { event_type, .. })) => {
                        assert_eq!(event_type, expected_type, "{name}");
                    }
                    other => panic!("{name}: {event:?} gave {other:?}"),
                }
                let stream = StreamId::new("Exact", &id);
                assert_eq!(store.stream_version(&stream).await.unwrap(), 0, "{name}");
            }
            assert_eq!(store.head_position().await.unwrap(), 0, "{name}");
        });
    }
}

/// An aggregate whose state holds a NaN takes no snapshot (it would read back as `null`);
/// its events are stored and a load replays them.
#[test]
fn a_state_holding_nan_takes_no_snapshot() {
    #[derive(Debug, Default, Serialize, Deserialize)]
    struct Average {
        mean: Option<f64>,
        count: u64,
    }
    impl Aggregate for Average {
        const TYPE: &'static str = "ExactStruct";
        type Event = ExactFilled;
        type Command = f64;
        type Error = std::convert::Infallible;
        fn apply(&mut self, event: &ExactFilled) {
            self.count += 1;
            // 0/0 on the first event: a NaN a snapshot cannot hold.
            self.mean = Some(event.price / (self.count - 1) as f64);
        }
        fn handle(&self, price: f64) -> Result<Vec<ExactFilled>, Self::Error> {
            Ok(vec![ExactFilled {
                price,
                qty: 0.0,
                id: 0,
                delta: 0,
                note: String::new(),
                tags: vec![],
                fees: BTreeMap::new(),
                parent: None,
            }])
        }
    }
    let stores = Stores::open();
    for (name, store) in &stores.stores {
        stores.runtime.block_on(async {
            let repo = Repository::<Average>::new(Arc::clone(store)).snapshot_every(1);
            repo.execute("avg", 0.0).await.unwrap();
            let stream = StreamId::new("ExactStruct", "avg");
            assert!(
                store.load_snapshot(&stream).await.unwrap().is_none(),
                "{name}: a snapshot of a NaN state was stored"
            );
            let (state, version) = repo.load("avg").await.unwrap();
            assert_eq!(version, 1, "{name}");
            assert!(state.mean.unwrap().is_nan(), "{name}");
        });
    }
}
