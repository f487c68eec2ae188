//! The store conformance suite against PostgreSQL, each case in a schema of its own.

mod common;

use eventfold_core::testing::conformance::StoreUnderTest;

async fn pg_store() -> StoreUnderTest {
    let schema = common::Schema::new();
    let store = schema.open().await;
    StoreUnderTest::with_guard(store, schema)
}

eventfold_core::store_conformance_tests!(pg_store, skip_if = common::no_server);
eventfold_core::lease_conformance_tests!(pg_store, skip_if = common::no_server);
