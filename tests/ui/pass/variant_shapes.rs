use eventfold::{DomainEvent, registry};
use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Shape")]
enum ShapeEvent {
    Unit,
    Newtype(u64),
    Tuple(u8, String),
    Struct { x: i32, y: i32 },
    EmptyTuple(),
    EmptyStruct {},
}

fn main() {
    for (event, payload) in [
        (ShapeEvent::Unit, "null"),
        (ShapeEvent::Newtype(7), "7"),
        (ShapeEvent::Tuple(1, "a".into()), r#"[1,"a"]"#),
        (ShapeEvent::Struct { x: -1, y: 2 }, r#"{"x":-1,"y":2}"#),
        (ShapeEvent::EmptyTuple(), "[]"),
        (ShapeEvent::EmptyStruct {}, "{}"),
    ] {
        assert_eq!(event.to_payload().unwrap(), payload);
        let back: ShapeEvent = registry().decode(event.event_type(), 1, payload).unwrap();
        assert_eq!(back, event);
    }
}
