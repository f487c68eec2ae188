//! The PostgreSQL store against hand-written tokio-postgres on the same server; the
//! scenarios are described in `scenarios.rs`, which the facade's
//! `perf_report --store postgres` runs too.
//!
//! ```text
//! cargo run --release -p eventfold-postgres --example pg_perf [-- --repeats 5] [--no-notify]
//!     [--only pg_append_batch] [--events 20000] [--quick]
//! ```
//!
//! Uses `EVENTFOLD_PG_URL` (default `postgres://postgres@127.0.0.1:5432/test`) and a schema
//! of its own per run, dropped after it. The machine is shared: quote the load with the
//! figures.

mod scenarios;

use eventfold_postgres::DEFAULT_URL;
use scenarios::{Bench, FULL, QUICK, Res, SCENARIOS};

#[tokio::main]
async fn main() -> Res<()> {
    // A member process of `pg_sub_scale`, started by the scenario itself.
    if let Ok(spec) = std::env::var(scenarios::SCALE_STORE) {
        let member = std::env::var(scenarios::SCALE_MEMBER)?;
        let pool = std::env::var(scenarios::SCALE_POOL)?.parse()?;
        let store = scenarios::scale_postgres_store(&spec)
            .await
            .ok_or_else(|| format!("unknown store {spec}"))??;
        return scenarios::scale_member(store, &member, pool).await;
    }
    let mut repeats = 5;
    let mut notify = true;
    let mut only = None;
    let mut counts = FULL;
    let mut bus_events = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--repeats" => repeats = args.next().ok_or("--repeats needs a number")?.parse()?,
            "--no-notify" => notify = false,
            "--quick" => counts = QUICK,
            "--only" => only = Some(args.next().ok_or("--only needs a scenario")?),
            "--events" => {
                bus_events = Some(
                    args.next()
                        .ok_or("--events needs a number (pg_bus_durable's events)")?
                        .parse()?,
                )
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if let Some(events) = bus_events {
        counts.bus_events = events;
    }
    if let Some(only) = only.as_deref()
        && !SCENARIOS.iter().any(|s| s.name == only)
    {
        return Err(format!("unknown scenario {only}").into());
    }
    let url = std::env::var("EVENTFOLD_PG_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    let mut bench = Bench::connect(&url, notify).await?;
    println!("repeats: {repeats}; medians; events/s or commands/s (store | raw | ratio)");
    for scenario in &SCENARIOS {
        if only.as_deref().is_some_and(|only| only != scenario.name) {
            continue;
        }
        let measured = bench.measure(scenario.name, counts, repeats).await?;
        println!(
            "{:<22} {:>10.0} | {:>10.0} | {:>5.2}x (goal >= {})",
            scenario.name, measured.store, measured.raw, measured.ratio, scenario.goal
        );
        if let Some(note) = measured.note {
            println!("{:<22} {note}", "");
        }
    }
    Ok(())
}
