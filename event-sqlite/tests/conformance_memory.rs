//! The store conformance suite against an in-memory SQLite database.

use eventfold_core::testing::conformance::StoreUnderTest;
use eventfold_sqlite::{SqliteEventStore, SqliteOptions};

async fn memory_store() -> StoreUnderTest {
    let store = SqliteEventStore::open_in_memory(SqliteOptions::new())
        .await
        .expect("the store opens");
    StoreUnderTest::new(store)
}

eventfold_core::store_conformance_tests!(memory_store);
eventfold_core::lease_conformance_tests!(memory_store);
