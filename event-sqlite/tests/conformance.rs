//! The store conformance suite against a SQLite database file.

use eventfold_core::testing::conformance::StoreUnderTest;
use eventfold_sqlite::{SqliteEventStore, SqliteOptions};

async fn file_store() -> StoreUnderTest {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = SqliteEventStore::open(dir.path().join("events.db"), SqliteOptions::new())
        .await
        .expect("the store opens");
    StoreUnderTest::with_guard(store, dir)
}

eventfold_core::store_conformance_tests!(file_store);
eventfold_core::lease_conformance_tests!(file_store);
