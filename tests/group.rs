//! Aggregates whose events are `#[derive(DomainEvent)]` structs grouped into one enum with
//! `#[domain_event(group)]`: what the group stands for, how stored rows of its members
//! decode into it (registry, records, replays, upcasters), and the group through the
//! repository, the bus and the test kit.

use std::sync::{Arc, Mutex};

use eventfold::backend::{ReplayVisitor, ReplayedEvent};
use eventfold::prelude::*;
use eventfold::testing::AggregateTest;
use eventfold::{Delivery, Error, EventBus, EventType, NewEvent, Outgoing};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "GroupWallet", name = "GroupWalletOpened")]
struct Opened {
    #[domain_event(aggregate_id)]
    wallet: String,
    owner: String,
}

/// Version 1 stored whole units as `amount`; version 2 stores `cents`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "GroupWallet", name = "GroupWalletCredited", version = 2)]
struct Credited {
    #[domain_event(aggregate_id)]
    wallet: String,
    cents: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "GroupWallet", name = "GroupWalletClosed")]
struct Closed;

fn credited_v1_to_v2(mut v: serde_json::Value) -> Result<serde_json::Value, String> {
    let amount = v["amount"].as_u64().ok_or("`amount` is missing")?;
    let object = v.as_object_mut().ok_or("not an object")?;
    object.remove("amount");
    object.insert("cents".into(), (amount * 100).into());
    Ok(v)
}
eventfold::upcaster!("GroupWalletCredited", 1, credited_v1_to_v2);

/// The wallet's events: the three structs, grouped. No `aggregate` key: the group takes its
/// members'.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[domain_event(group)]
enum WalletEvent {
    Opened(Opened),
    Credited(Credited),
    Closed(Closed),
}

/// An event struct of another aggregate, for the refusals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "GroupOther", name = "GroupOtherHappened")]
struct OtherHappened;

#[derive(Debug, Default, Clone, PartialEq)]
struct Wallet {
    owner: Option<String>,
    cents: u64,
    closed: bool,
}

#[derive(Debug, Clone)]
enum WalletCommand {
    Open { wallet: String, owner: String },
    Credit { wallet: String, cents: u64 },
    Close,
}

#[derive(Debug, PartialEq, thiserror::Error)]
enum WalletError {
    #[error("the wallet is not open")]
    NotOpen,
}

impl Aggregate for Wallet {
    // No `const TYPE`: it is the events' aggregate type.
    type Event = WalletEvent;
    type Command = WalletCommand;
    type Error = WalletError;

    fn apply(&mut self, event: &WalletEvent) {
        match event {
            WalletEvent::Opened(Opened { owner, .. }) => self.owner = Some(owner.clone()),
            WalletEvent::Credited(Credited { cents, .. }) => self.cents += cents,
            WalletEvent::Closed(Closed) => self.closed = true,
        }
    }

    fn handle(&self, command: WalletCommand) -> Result<Vec<WalletEvent>, WalletError> {
        match command {
            WalletCommand::Open { wallet, owner } => Ok(vec![Opened { wallet, owner }.into()]),
            _ if self.owner.is_none() || self.closed => Err(WalletError::NotOpen),
            WalletCommand::Credit { wallet, cents } => Ok(vec![Credited { wallet, cents }.into()]),
            WalletCommand::Close => Ok(vec![Closed.into()]),
        }
    }
}

fn opened(wallet: &str) -> WalletEvent {
    WalletEvent::Opened(Opened {
        wallet: wallet.into(),
        owner: "ada".into(),
    })
}

fn credited(wallet: &str, cents: u64) -> WalletEvent {
    WalletEvent::Credited(Credited {
        wallet: wallet.into(),
        cents,
    })
}

fn store() -> Arc<dyn EventStore> {
    Arc::new(InMemoryEventStore::new())
}

#[test]
fn a_group_stands_for_the_event_types_of_its_members() {
    assert_eq!(WalletEvent::AGGREGATE_TYPE, "GroupWallet");
    assert_eq!(<Wallet as Aggregate>::TYPE, "GroupWallet");
    assert_eq!(
        WalletEvent::EVENT_TYPES,
        &[
            EventType::new("GroupWalletOpened", 1),
            EventType::new("GroupWalletCredited", 2),
            EventType::new("GroupWalletClosed", 1),
        ]
    );
    for (event, member_payload) in [
        (
            opened("w-1"),
            Opened {
                wallet: "w-1".into(),
                owner: "ada".into(),
            }
            .to_payload(),
        ),
        (
            credited("w-1", 5),
            Credited {
                wallet: "w-1".into(),
                cents: 5,
            }
            .to_payload(),
        ),
        (WalletEvent::Closed(Closed), Closed.to_payload()),
    ] {
        // Each event keeps its member's name, version, aggregate id and payload.
        assert_eq!(event.to_payload().unwrap(), member_payload.unwrap());
    }
    let event = credited("w-1", 5);
    assert_eq!(
        (event.event_type(), event.schema_version()),
        ("GroupWalletCredited", 2)
    );
    assert_eq!(event.aggregate_id().as_deref(), Some("w-1"));
    assert_eq!(WalletEvent::Closed(Closed).aggregate_id(), None);
    assert_eq!(WalletEvent::from(Closed), WalletEvent::Closed(Closed));
}

#[test]
fn a_group_registers_nothing_and_the_registry_stays_valid() {
    registry().validate().unwrap();
    registry().expect_type::<WalletEvent>().unwrap();
    let info = registry().get("GroupWalletCredited").unwrap();
    assert!(info.rust_type.ends_with("::Credited"), "{}", info.rust_type);
    // The variant names, which are also the members' Rust names, are no event types.
    for name in ["Opened", "Credited", "Closed"] {
        assert!(registry().get(name).is_none(), "{name} is registered");
    }
}

#[test]
fn a_stored_member_decodes_into_the_group_and_into_the_member() {
    let payload = r#"{"wallet":"w-1","cents":7}"#;
    let group: WalletEvent = registry()
        .decode("GroupWalletCredited", 2, payload)
        .unwrap();
    assert_eq!(group, credited("w-1", 7));
    let member: Credited = registry()
        .decode("GroupWalletCredited", 2, payload)
        .unwrap();
    assert_eq!(member.cents, 7);
    // A type-erased decode gives the member: the group registers nothing.
    let any = registry()
        .decode_any("GroupWalletCredited", 2, payload)
        .unwrap();
    assert!(any.downcast_ref::<Credited>().is_some());
}

#[test]
fn upcasters_run_by_the_member_name_when_decoding_the_group() {
    let group: WalletEvent = registry()
        .decode("GroupWalletCredited", 1, r#"{"wallet":"w-1","amount":3}"#)
        .unwrap();
    assert_eq!(group, credited("w-1", 300));
    assert!(matches!(
        registry().decode::<WalletEvent>("GroupWalletCredited", 3, "{}"),
        Err(Error::SchemaTooNew {
            stored: 3,
            known: 2,
            ..
        })
    ));
}

#[test]
fn an_event_outside_the_group_is_refused_by_name() {
    assert!(matches!(
        registry().decode::<WalletEvent>("GroupOtherHappened", 1, "null"),
        Err(Error::WrongEventType { registered, requested, .. })
            if registered.ends_with("OtherHappened") && requested.ends_with("WalletEvent")
    ));
    assert!(matches!(
        registry().decode::<WalletEvent>("NoSuchEvent", 1, "null"),
        Err(Error::UnknownEventType { .. })
    ));
    // A member's row does not decode into another member.
    assert!(matches!(
        registry().decode::<Opened>("GroupWalletClosed", 1, "null"),
        Err(Error::WrongEventType { .. })
    ));
    // Nor does a payload of one member's shape pass as another's.
    assert!(matches!(
        registry().decode::<WalletEvent>("GroupWalletOpened", 1, r#"{"wallet":"w","cents":1}"#),
        Err(Error::Payload { .. })
    ));
}

#[tokio::test]
async fn the_repository_stores_members_and_replays_them_into_the_group() {
    let store = store();
    let repo = Repository::<Wallet>::new(Arc::clone(&store));
    let open = WalletCommand::Open {
        wallet: "w-1".into(),
        owner: "ada".into(),
    };
    repo.execute("w-1", open).await.unwrap();
    let credit = WalletCommand::Credit {
        wallet: "w-1".into(),
        cents: 40,
    };
    let committed = repo.execute("w-1", credit).await.unwrap();
    assert_eq!(committed.events, [credited("w-1", 40)]);

    // A row of version 1, appended by an older program, is upcast on replay.
    let stream = StreamId::new("GroupWallet", "w-1");
    let mut old = NewEvent::from_event(&credited("w-1", 0), Metadata::default()).unwrap();
    old.schema_version = 1;
    old.payload = r#"{"wallet":"w-1","amount":2}"#.into();
    store
        .append(&stream, ExpectedVersion::Exact(2), vec![old])
        .await
        .unwrap();

    let (wallet, version) = repo.load("w-1").await.unwrap();
    assert_eq!(version, 3);
    assert_eq!(wallet.owner.as_deref(), Some("ada"));
    assert_eq!(wallet.cents, 240);

    // The rows are the members' own: their names and versions, under the members' aggregate.
    let rows = store.read_stream(&stream, 1).await.unwrap();
    let names: Vec<&str> = rows.iter().map(|r| &*r.event_type).collect();
    assert_eq!(
        names,
        [
            "GroupWalletOpened",
            "GroupWalletCredited",
            "GroupWalletCredited"
        ]
    );
    assert_eq!(rows[1].schema_version, 2);
    assert_eq!(rows[0].decode::<WalletEvent>().unwrap(), opened("w-1"));
    assert_eq!(rows[0].decode::<Opened>().unwrap().owner, "ada");
    assert_eq!(rows[2].decode::<Credited>().unwrap().cents, 200);
}

/// Collects what a replay hands it, decoded into the group.
struct Collect(Vec<WalletEvent>);

impl ReplayVisitor for Collect {
    fn visit(&mut self, event: ReplayedEvent<'_>) -> eventfold::Result<()> {
        self.0.push(event.decode::<WalletEvent>()?);
        Ok(())
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }
}

#[tokio::test]
async fn a_replayed_member_decodes_into_the_group() {
    let store = store();
    let repo = Repository::<Wallet>::new(Arc::clone(&store));
    let open = WalletCommand::Open {
        wallet: "w-2".into(),
        owner: "ada".into(),
    };
    repo.execute("w-2", open).await.unwrap();
    repo.execute("w-2", WalletCommand::Close).await.unwrap();
    let stream = StreamId::new("GroupWallet", "w-2");
    let visitor = store
        .replay_stream(&stream, 1, Box::new(Collect(Vec::new())))
        .await
        .unwrap();
    let seen = visitor.into_any().downcast::<Collect>().unwrap().0;
    assert_eq!(seen, [opened("w-2"), WalletEvent::Closed(Closed)]);
}

type Log = Arc<Mutex<Vec<String>>>;

#[tokio::test]
async fn the_durable_bus_delivers_members_to_group_and_member_subscriptions() {
    let store = store();
    let bus = EventBus::builder()
        .store(Arc::clone(&store))
        .build()
        .unwrap();
    let by_group: Log = Arc::default();
    let by_member: Log = Arc::default();
    let log = Arc::clone(&by_group);
    bus.subscribe("wallet-group", move |d: Delivery<WalletEvent>| {
        log.lock().unwrap().push(format!("{:?}", d.event()));
        async { Ok::<_, Error>(()) }
    })
    .register()
    .unwrap();
    let log = Arc::clone(&by_member);
    bus.subscribe("wallet-credits", move |d: Delivery<Credited>| {
        log.lock()
            .unwrap()
            .push(format!("{}:{}", d.record().aggregate_id, d.event().cents));
        async { Ok::<_, Error>(()) }
    })
    .register()
    .unwrap();
    bus.start().await.unwrap();

    // Through the repository, and published as the group and as a member.
    let repo = Repository::<Wallet>::new(Arc::clone(&store));
    let open = WalletCommand::Open {
        wallet: "w-3".into(),
        owner: "ada".into(),
    };
    repo.execute("w-3", open).await.unwrap();
    bus.publish(credited("w-3", 10)).await.unwrap();
    bus.publish(Credited {
        wallet: "w-3".into(),
        cents: 20,
    })
    .await
    .unwrap();
    bus.wait_idle().await.unwrap();

    assert_eq!(
        *by_group.lock().unwrap(),
        [
            format!("{:?}", opened("w-3")),
            format!("{:?}", credited("w-3", 10)),
            format!("{:?}", credited("w-3", 20)),
        ]
    );
    assert_eq!(*by_member.lock().unwrap(), ["w-3:10", "w-3:20"]);
    // Published events are stored under the members' aggregate type, as the repository's.
    let all = store.read_all(1, 10).await.unwrap();
    assert!(all.iter().all(|r| r.aggregate_type == "GroupWallet"));
    assert!(all.iter().all(|r| r.aggregate_id == "w-3"));
    bus.stop().await.unwrap();
}

#[tokio::test]
async fn the_transient_bus_hands_a_group_to_member_subscriptions_and_back() {
    let bus = EventBus::builder().build().unwrap();
    let by_group: Log = Arc::default();
    let by_member: Log = Arc::default();
    let log = Arc::clone(&by_group);
    bus.subscribe("group", move |d: Delivery<WalletEvent>| {
        log.lock().unwrap().push(d.event().event_type().to_owned());
        async { Ok::<_, Error>(()) }
    })
    .register()
    .unwrap();
    let log = Arc::clone(&by_member);
    bus.subscribe("opened", move |d: Delivery<Opened>| {
        log.lock().unwrap().push(d.event().owner.clone());
        async { Ok::<_, Error>(()) }
    })
    .register()
    .unwrap();
    bus.start().await.unwrap();
    bus.publish(opened("w-4")).await.unwrap();
    // One aggregate, so that the deliveries keep the publishing order.
    bus.publish(Outgoing::new(Opened {
        wallet: "w-4".into(),
        owner: "eve".into(),
    }))
    .await
    .unwrap();
    // A member without an aggregate id field needs one given, in the group as alone.
    assert!(matches!(
        bus.publish(WalletEvent::Closed(Closed)).await,
        Err(Error::MissingAggregateId { event_type }) if event_type == "GroupWalletClosed"
    ));
    bus.publish(Outgoing::new(WalletEvent::Closed(Closed)).to("w-4"))
        .await
        .unwrap();
    bus.wait_idle().await.unwrap();
    assert_eq!(
        *by_group.lock().unwrap(),
        [
            "GroupWalletOpened",
            "GroupWalletOpened",
            "GroupWalletClosed"
        ]
    );
    assert_eq!(*by_member.lock().unwrap(), ["ada", "eve"]);
    bus.stop().await.unwrap();
}

#[test]
fn the_test_kit_runs_a_struct_aggregate() {
    AggregateTest::<Wallet>::given([opened("w-1")])
        .when(WalletCommand::Credit {
            wallet: "w-1".into(),
            cents: 5,
        })
        .then_events([credited("w-1", 5)]);
    AggregateTest::<Wallet>::given([opened("w-1"), Closed.into()])
        .when(WalletCommand::Close)
        .then_error(WalletError::NotOpen);
    AggregateTest::<Wallet>::given_nothing()
        .when(WalletCommand::Close)
        .then_error(WalletError::NotOpen);
}

/// A failing subscription of a member on a transient bus, given the group: its dead letter
/// keeps the event's stored form, so a replay delivers it (this once took the worker down:
/// it expected a subscription to receive only its own Rust type).
#[tokio::test]
async fn a_dead_letter_of_a_member_published_as_the_group_replays() {
    let bus = EventBus::builder().build().unwrap();
    let healed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen: Log = Arc::default();
    let (flag, log) = (Arc::clone(&healed), Arc::clone(&seen));
    bus.subscribe("credits", move |d: Delivery<Credited>| {
        let result = if flag.load(std::sync::atomic::Ordering::SeqCst) {
            log.lock().unwrap().push(format!("{}", d.event().cents));
            Ok(())
        } else {
            Err(Error::BusStopped)
        };
        async move { result }
    })
    .retry(eventfold::RetryPolicy::never())
    .register()
    .unwrap();
    bus.start().await.unwrap();
    bus.publish(credited("w-6", 9)).await.unwrap();
    bus.wait_idle().await.unwrap();
    let dead = bus.dead_letters(Some("credits")).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].event_type, "GroupWalletCredited");

    healed.store(true, std::sync::atomic::Ordering::SeqCst);
    bus.replay_dead_letter(dead[0].id).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), ["9"]);
    assert!(bus.dead_letters(Some("credits")).await.unwrap().is_empty());
    bus.stop().await.unwrap();
}

/// An enum deriving `DomainEvent` can be a member too, next to structs, and the group can
/// name its aggregate type itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "GroupWallet")]
enum Limits {
    #[domain_event(name = "GroupWalletLimitRaised")]
    Raised { to: u64 },
    #[domain_event(name = "GroupWalletLimitCleared")]
    Cleared,
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[domain_event(aggregate = "GroupWallet", group)]
enum WalletAdminEvent {
    Limits(Limits),
    Closed(Closed),
}

#[test]
fn an_enum_member_brings_all_its_event_types() {
    assert_eq!(
        WalletAdminEvent::EVENT_TYPES,
        &[
            EventType::new("GroupWalletLimitRaised", 1),
            EventType::new("GroupWalletLimitCleared", 1),
            EventType::new("GroupWalletClosed", 1),
        ]
    );
    let raised = WalletAdminEvent::Limits(Limits::Raised { to: 9 });
    assert_eq!(raised.to_payload().unwrap(), r#"{"to":9}"#);
    for event in [
        raised,
        WalletAdminEvent::Limits(Limits::Cleared),
        WalletAdminEvent::Closed(Closed),
    ] {
        let payload = event.to_payload().unwrap();
        let back: WalletAdminEvent = registry()
            .decode(event.event_type(), event.schema_version(), &payload)
            .unwrap();
        assert_eq!(back, event);
    }
    // Two groups may share a member: neither registers anything.
    let closed: WalletEvent = registry().decode("GroupWalletClosed", 1, "null").unwrap();
    assert_eq!(closed, WalletEvent::Closed(Closed));
    registry().validate().unwrap();
}
