//! The durable event bus over the PostgreSQL store: a subscription on one store handle
//! (another process, in effect) handles what a bus on another handle publishes, keeps its
//! checkpoint in the database, and a restarted bus resumes from it.

mod common;

use std::sync::{Arc, Mutex};

use eventfold_core::{Delivery, Error, EventBus, EventLog, SubscriptionStore};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, eventfold_macros::DomainEvent)]
#[domain_event(aggregate = "Order", crate = "eventfold_core")]
enum OrderEvent {
    #[domain_event(name = "OrderPlaced")]
    Placed {
        #[domain_event(aggregate_id)]
        order: String,
        seq: u64,
    },
}

fn placed(order: &str, seq: u64) -> OrderEvent {
    OrderEvent::Placed {
        order: order.into(),
        seq,
    }
}

type Seen = Arc<Mutex<Vec<(String, u64)>>>;

fn recorder(
    seen: &Seen,
) -> impl Fn(Delivery<OrderEvent>) -> std::future::Ready<Result<(), Error>> + Send + Sync + 'static
{
    let seen = Arc::clone(seen);
    move |d: Delivery<OrderEvent>| {
        let OrderEvent::Placed { order, seq } = d.event();
        seen.lock().unwrap().push((order.clone(), *seq));
        std::future::ready(Ok(()))
    }
}

fn bus(store: &eventfold_postgres::PostgresEventStore) -> EventBus {
    EventBus::builder()
        .store(store.clone())
        .workers(2)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_subscription_on_another_store_handles_what_one_publishes() {
    if common::no_server() {
        return;
    }
    let schema = common::Schema::new();
    let publisher_store = schema.open().await;
    let consumer_store = schema.open().await;
    let seen: Seen = Arc::default();

    let consumer = bus(&consumer_store);
    consumer
        .subscribe("audit", recorder(&seen))
        .register()
        .unwrap();
    consumer.start().await.unwrap();
    let publisher = bus(&publisher_store);
    publisher.start().await.unwrap();
    let range = publisher
        .publish_batch((1..=50).map(|i| placed(&format!("o-{}", i % 5), i)))
        .await
        .unwrap();
    assert_eq!(range, 1..=50);
    // The consumer's store learns of the appends through NOTIFY (its head watch), reads
    // them from the log and hands them to the subscription.
    let mut head = consumer_store.watch_head();
    while *head.borrow_and_update() < 50 {
        head.changed().await.unwrap();
    }
    consumer.wait_idle().await.unwrap();
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 50);
        for order in 0..5 {
            let name = format!("o-{order}");
            let seqs: Vec<u64> = seen.iter().filter(|e| e.0 == name).map(|e| e.1).collect();
            let expected: Vec<u64> = (1..=50).filter(|i| i % 5 == order).collect();
            assert_eq!(seqs, expected, "each aggregate in order");
        }
    }
    consumer.stop().await.unwrap();
    assert_eq!(
        consumer_store.load_checkpoint("audit").await.unwrap(),
        Some(50)
    );

    // Published while no consumer runs: the next consumer catches up on them, and only them.
    publisher
        .publish_batch((51..=60).map(|i| placed("o-late", i)))
        .await
        .unwrap();
    publisher.stop().await.unwrap();
    let again_store = schema.open().await;
    let again = bus(&again_store);
    let later: Seen = Arc::default();
    again
        .subscribe("audit", recorder(&later))
        .register()
        .unwrap();
    again.start().await.unwrap();
    again.wait_idle().await.unwrap();
    assert_eq!(
        later
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.1)
            .collect::<Vec<_>>(),
        (51..=60).collect::<Vec<_>>()
    );
    again.stop().await.unwrap();
    assert_eq!(
        again_store.load_checkpoint("audit").await.unwrap(),
        Some(60)
    );
}
