//! eventfold's metrics in Prometheus' text format: a recorder installed before the store
//! opens, a few commands and a subscription, then the metrics served on
//! `http://127.0.0.1:9898/metrics` (with `--serve`) or printed once.
//!
//! ```sh
//! cargo run --example metrics             # prints the metrics once
//! cargo run --example metrics -- --serve  # serves them until Ctrl-C
//! ```
//!
//! eventfold records through the `metrics` facade and installs no recorder: any exporter
//! works. This one is `metrics-exporter-prometheus` without its own HTTP server; a
//! service that has one (axum, hyper) serves `handle.render()` from a route instead.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

use eventfold::prelude::*;
use eventfold::{Delivery, EventSystem, metrics};
use metrics_exporter_prometheus::PrometheusBuilder;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Meter")]
enum MeterEvent {
    Read { kwh: u64 },
}

#[derive(Debug, Default)]
struct Meter {
    total: u64,
}

impl Aggregate for Meter {
    type Event = MeterEvent;
    type Command = u64;
    type Error = std::convert::Infallible;

    fn apply(&mut self, MeterEvent::Read { kwh }: &MeterEvent) {
        self.total += kwh;
    }

    fn handle(&self, kwh: u64) -> Result<Vec<MeterEvent>, Self::Error> {
        Ok(vec![MeterEvent::Read { kwh }])
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    registry().validate()?;
    // First the recorder, then the store and the bus: they take their metric handles
    // when they are created.
    let handle = PrometheusBuilder::new().install_recorder()?;
    metrics::describe();

    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("metrics.db").display());
    let system = EventSystem::open_url(&url).await?;
    let bus = system.bus();
    let totals = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = std::sync::Arc::clone(&totals);
    bus.subscribe("meter-totals", move |d: Delivery<MeterEvent>| {
        let MeterEvent::Read { kwh } = *d.event();
        counted.fetch_add(kwh, std::sync::atomic::Ordering::Relaxed);
        async {}
    })
    .register()?;
    let repo = system.repository::<Meter>();
    for i in 0..20u64 {
        repo.execute(&format!("meter-{}", i % 4), i).await?;
    }
    bus.wait_idle().await?;
    // Stopping saves the checkpoint: the lag gauge reads 0.
    system.shutdown().await?;

    if std::env::args().any(|a| a == "--serve") {
        let listener = TcpListener::bind("127.0.0.1:9898")?;
        println!("serving http://127.0.0.1:9898/metrics (Ctrl-C to stop)");
        for stream in listener.incoming() {
            let mut stream = stream?;
            // The request line and headers are read and ignored: every path is /metrics.
            let mut reader = BufReader::new(&stream);
            let mut line = String::new();
            while reader.read_line(&mut line)? > 2 {
                line.clear();
            }
            let body = handle.render();
            write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )?;
        }
    } else {
        print!("{}", handle.render());
    }
    Ok(())
}
