//! The in-memory store keeps each event decoded (made once, when it is appended) and lends
//! the decoded value to replays: loads fold what a decode of the stored payload gives, and
//! whatever does not decode still fails the load as it would on any store.

mod common;

use std::any::Any;
use std::sync::{Arc, Mutex};

use common::{Account, AccountCommand, AccountEvent};
use eventfold::backend::{EventLog, ReplayVisitor, ReplayedEvent, Uuid};
use eventfold::prelude::*;
use eventfold::{Error, IntoStore, NewEvent};

/// Version 1 of `FundsDeposited` counted whole units; version 2 counts cents.
fn deposited_v1_to_v2(mut v: serde_json::Value) -> Result<serde_json::Value, String> {
    let amount = v["amount"].as_u64().ok_or("amount is missing")?;
    v["amount"] = (amount * 100).into();
    Ok(v)
}
eventfold::upcaster!("FundsDeposited", 1, deposited_v1_to_v2);

/// What a replay handed to a visitor: per event, its version and whether it came decoded
/// (and then the decoded value, if it is an `AccountEvent`).
#[derive(Default, Clone)]
struct Seen(Arc<Mutex<Vec<Visit>>>);

/// An event's version, its decoded value (if lent decoded), and whether it was.
type Visit = (u64, Option<AccountEvent>, bool);

impl ReplayVisitor for Seen {
    fn visit(&mut self, event: ReplayedEvent<'_>) -> eventfold::Result<()> {
        self.0.lock().unwrap().push((event.version, None, false));
        Ok(())
    }

    fn visit_decoded(
        &mut self,
        event: ReplayedEvent<'_>,
        decoded: &dyn Any,
    ) -> eventfold::Result<()> {
        let typed = decoded.downcast_ref::<AccountEvent>().cloned();
        // The decoded value is the registry's decode of the very payload lent with it.
        let fresh: AccountEvent = event.decode()?;
        assert_eq!(typed.as_ref(), Some(&fresh));
        self.0.lock().unwrap().push((event.version, typed, true));
        Ok(())
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

fn stream() -> StreamId {
    StreamId::new("Account", "a-1")
}

fn raw(event_type: &str, schema_version: u32, payload: &str) -> NewEvent {
    let event =
        NewEvent::from_event(&AccountEvent::Withdrawn { amount: 0 }, Metadata::new()).unwrap();
    NewEvent {
        event_type: event_type.into(),
        schema_version,
        payload: payload.into(),
        ..event
    }
}

#[tokio::test]
async fn a_memory_replay_lends_each_registered_event_decoded_and_the_rest_as_stored() {
    let store = InMemoryEventStore::new();
    let repo = Repository::<Account>::new(store.clone());
    repo.execute(
        "a-1",
        AccountCommand::Open {
            owner: "Ada".into(),
        },
    )
    .await
    .unwrap();
    // Written at schema version 1; the decode upcasts it (the upcaster of tests/common).
    store
        .append(
            &stream(),
            ExpectedVersion::Exact(1),
            vec![raw("FundsDeposited", 1, r#"{"amount":3}"#)],
        )
        .await
        .unwrap();
    store
        .append(
            &stream(),
            ExpectedVersion::Exact(2),
            vec![raw("NoSuchType", 1, "{}")],
        )
        .await
        .unwrap();
    let seen = Seen::default();
    store
        .replay_stream(&stream(), 1, Box::new(seen.clone()))
        .await
        .unwrap();
    let seen = seen.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    assert_eq!(
        seen[0],
        (
            1,
            Some(AccountEvent::Opened {
                owner: "Ada".into()
            }),
            true
        )
    );
    assert_eq!(
        seen[1],
        (2, Some(AccountEvent::Deposited { amount: 300 }), true)
    );
    assert_eq!(seen[2], (3, None, false));
}

#[tokio::test]
async fn a_memory_load_of_an_event_that_does_not_decode_fails_at_that_event() {
    for (event_type, payload) in [("NoSuchType", "{}"), ("Withdrawn", r#"{"amount":"ten"}"#)] {
        let store = InMemoryEventStore::new();
        let repo = Repository::<Account>::new(store.clone());
        repo.execute(
            "a-1",
            AccountCommand::Open {
                owner: "Ada".into(),
            },
        )
        .await
        .unwrap();
        let bad = raw(event_type, 1, payload);
        let bad_id: Uuid = bad.event_id;
        store
            .append(&stream(), ExpectedVersion::Exact(1), vec![bad])
            .await
            .unwrap();
        let error = repo.load("a-1").await.unwrap_err();
        match &error {
            Error::UnknownEventType {
                event_id, position, ..
            }
            | Error::Payload {
                event_id, position, ..
            } => {
                assert_eq!((*event_id, *position), (Some(bad_id), Some(2)), "{error:?}");
            }
            other => panic!("{event_type}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_memory_load_folds_the_same_state_as_a_sqlite_load() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = eventfold::SqliteEventStore::open(dir.path().join("same.db"), Default::default())
        .await
        .unwrap();
    let memory = InMemoryEventStore::new();
    for store in [memory.clone().into_store(), sqlite.clone().into_store()] {
        let repo = Repository::<Account>::new(store);
        repo.execute(
            "a-1",
            AccountCommand::Open {
                owner: "Ada".into(),
            },
        )
        .await
        .unwrap();
        for amount in [5, 7, 11] {
            repo.execute("a-1", AccountCommand::Deposit(amount))
                .await
                .unwrap();
        }
        repo.execute("a-1", AccountCommand::Withdraw(4))
            .await
            .unwrap();
    }
    let from_memory = Repository::<Account>::new(memory)
        .load("a-1")
        .await
        .unwrap();
    let from_sqlite = Repository::<Account>::new(sqlite.clone())
        .load("a-1")
        .await
        .unwrap();
    assert_eq!(from_memory, from_sqlite);
    assert_eq!(from_memory.0.balance, 19);
    sqlite.close().await.unwrap();
}
