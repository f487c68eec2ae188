//! What `#[derive(DomainEvent)]` generates, seen at run time through the facade.

use eventfold::{DomainEvent, Error, EventType, registry};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "DeriveAccount")]
enum AccountEvent {
    Opened {
        #[domain_event(aggregate_id)]
        account: String,
        owner: String,
    },
    #[domain_event(name = "DeriveFundsDeposited", version = 2)]
    Deposited {
        amount: u64,
    },
    Frozen(#[domain_event(aggregate_id)] u32, String),
    Closed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "DeriveOrder", name = "DeriveOrderFilled", version = 3)]
struct OrderFilled {
    #[domain_event(aggregate_id)]
    order_id: u64,
    price: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "DeriveOrder")]
struct DeriveOrderCancelled;

/// serde renames the variants; eventfold still addresses them by position and by its own
/// names (the Rust identifiers here).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[serde(rename_all = "snake_case")]
#[domain_event(aggregate = "DeriveLedger", version = 4)]
enum LedgerEvent {
    DeriveLedgerCredited {
        #[serde(rename = "amountCents")]
        amount: i64,
    },
    #[serde(rename = "debit")]
    #[domain_event(version = 1)]
    DeriveLedgerDebited(i64),
}

fn round_trip<E: DomainEvent + PartialEq + std::fmt::Debug>(event: &E) {
    let payload = event.to_payload().unwrap();
    let back: E = registry()
        .decode(event.event_type(), event.schema_version(), &payload)
        .unwrap_or_else(|e| panic!("{event:?} from {payload}: {e}"));
    assert_eq!(&back, event);
}

#[test]
fn enum_variants_have_their_names_and_versions() {
    let opened = AccountEvent::Opened {
        account: "acc-1".into(),
        owner: "ada".into(),
    };
    assert_eq!(opened.event_type(), "Opened");
    assert_eq!(opened.schema_version(), 1);
    let deposited = AccountEvent::Deposited { amount: 5 };
    assert_eq!(deposited.event_type(), "DeriveFundsDeposited");
    assert_eq!(deposited.schema_version(), 2);
    assert_eq!(AccountEvent::Closed.event_type(), "Closed");

    assert_eq!(AccountEvent::AGGREGATE_TYPE, "DeriveAccount");
    assert_eq!(
        AccountEvent::EVENT_TYPES,
        &[
            EventType::new("Opened", 1),
            EventType::new("DeriveFundsDeposited", 2),
            EventType::new("Frozen", 1),
            EventType::new("Closed", 1),
        ]
    );
}

#[test]
fn struct_event_has_its_name_version_and_aggregate() {
    let filled = OrderFilled {
        order_id: 42,
        price: 7,
    };
    assert_eq!(filled.event_type(), "DeriveOrderFilled");
    assert_eq!(filled.schema_version(), 3);
    assert_eq!(OrderFilled::AGGREGATE_TYPE, "DeriveOrder");
    assert_eq!(
        OrderFilled::EVENT_TYPES,
        &[EventType::new("DeriveOrderFilled", 3)]
    );
    assert_eq!(DeriveOrderCancelled.event_type(), "DeriveOrderCancelled");
    assert_eq!(DeriveOrderCancelled.schema_version(), 1);
}

#[test]
fn aggregate_id_comes_from_the_marked_field() {
    let opened = AccountEvent::Opened {
        account: "acc-1".into(),
        owner: "ada".into(),
    };
    assert_eq!(opened.aggregate_id().as_deref(), Some("acc-1"));
    let frozen = AccountEvent::Frozen(17, "fraud".into());
    assert_eq!(frozen.aggregate_id().as_deref(), Some("17"));
    assert_eq!(AccountEvent::Deposited { amount: 5 }.aggregate_id(), None);
    assert_eq!(AccountEvent::Closed.aggregate_id(), None);

    let filled = OrderFilled {
        order_id: 42,
        price: 7,
    };
    assert_eq!(filled.aggregate_id().as_deref(), Some("42"));
    assert_eq!(DeriveOrderCancelled.aggregate_id(), None);
}

#[test]
fn payload_is_the_content_without_the_enum_tag() {
    let deposited = AccountEvent::Deposited { amount: 5 };
    assert_eq!(deposited.to_payload().unwrap(), r#"{"amount":5}"#);
    let frozen = AccountEvent::Frozen(17, "fraud".into());
    assert_eq!(frozen.to_payload().unwrap(), r#"[17,"fraud"]"#);
    assert_eq!(AccountEvent::Closed.to_payload().unwrap(), "null");
    let filled = OrderFilled {
        order_id: 42,
        price: 7,
    };
    assert_eq!(filled.to_payload().unwrap(), r#"{"order_id":42,"price":7}"#);
    assert_eq!(DeriveOrderCancelled.to_payload().unwrap(), "null");
}

#[test]
fn every_event_round_trips_through_the_registry() {
    round_trip(&AccountEvent::Opened {
        account: "acc-1".into(),
        owner: "ada".into(),
    });
    round_trip(&AccountEvent::Deposited { amount: 5 });
    round_trip(&AccountEvent::Frozen(17, "fraud".into()));
    round_trip(&AccountEvent::Closed);
    round_trip(&OrderFilled {
        order_id: 42,
        price: 7,
    });
    round_trip(&DeriveOrderCancelled);
}

#[test]
fn serde_renamed_variants_round_trip() {
    let credited = LedgerEvent::DeriveLedgerCredited { amount: -3 };
    assert_eq!(credited.event_type(), "DeriveLedgerCredited");
    assert_eq!(credited.schema_version(), 4);
    assert_eq!(credited.to_payload().unwrap(), r#"{"amountCents":-3}"#);
    let debited = LedgerEvent::DeriveLedgerDebited(9);
    assert_eq!(debited.event_type(), "DeriveLedgerDebited");
    assert_eq!(debited.schema_version(), 1);
    round_trip(&credited);
    round_trip(&debited);
}

#[test]
fn the_registry_knows_every_derived_event_type() {
    let names = registry().names();
    for name in [
        "Opened",
        "DeriveFundsDeposited",
        "Frozen",
        "Closed",
        "DeriveOrderFilled",
        "DeriveOrderCancelled",
        "DeriveLedgerCredited",
        "DeriveLedgerDebited",
    ] {
        assert!(names.contains(&name), "{name} is not in {names:?}");
    }
    registry().expect_type::<AccountEvent>().unwrap();
    registry().expect_type::<LedgerEvent>().unwrap();

    let deposited = registry().get("DeriveFundsDeposited").unwrap();
    assert_eq!(deposited.name, "DeriveFundsDeposited");
    assert_eq!(deposited.aggregate_type, "DeriveAccount");
    assert_eq!(deposited.version, 2);
    assert_eq!(deposited.rust_type, std::any::type_name::<AccountEvent>());

    let filled = registry().get("DeriveOrderFilled").unwrap();
    assert_eq!(filled.aggregate_type, "DeriveOrder");
    assert_eq!(filled.version, 3);
    assert_eq!(filled.rust_type, std::any::type_name::<OrderFilled>());
}

#[test]
fn decoding_a_name_of_another_type_is_wrong_event_type() {
    let payload = OrderFilled {
        order_id: 42,
        price: 7,
    }
    .to_payload()
    .unwrap();
    let err = registry()
        .decode::<AccountEvent>("DeriveOrderFilled", 3, &payload)
        .unwrap_err();
    assert!(
        matches!(&err, Error::WrongEventType { event_type, .. } if event_type == "DeriveOrderFilled"),
        "{err:?}"
    );
    let err = registry()
        .decode::<OrderFilled>("DeriveFundsDeposited", 2, r#"{"amount":5}"#)
        .unwrap_err();
    assert!(matches!(err, Error::WrongEventType { .. }), "{err:?}");
}

#[test]
fn content_of_another_variant_does_not_decode() {
    let err = registry()
        .decode::<AccountEvent>("DeriveFundsDeposited", 2, r#"{"owner":"ada"}"#)
        .unwrap_err();
    assert!(matches!(err, Error::Payload { .. }), "{err:?}");
}

#[test]
fn the_generated_deserializer_refuses_a_name_it_does_not_own() {
    let mut de = serde_json::Deserializer::from_str(r#"{"amount":5}"#);
    let err = AccountEvent::__deserialize_payload("Nope", &mut de).unwrap_err();
    assert!(err.to_string().contains("unknown variant `Nope`"), "{err}");
    let mut de = serde_json::Deserializer::from_str("null");
    let err = DeriveOrderCancelled::__deserialize_payload("Opened", &mut de).unwrap_err();
    assert!(err.to_string().contains("DeriveOrderCancelled"), "{err}");
}
