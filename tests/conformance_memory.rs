//! The store conformance suite against the in-memory store.

use eventfold::InMemoryEventStore;
use eventfold_core::testing::conformance::StoreUnderTest;

async fn memory_store() -> StoreUnderTest {
    StoreUnderTest::new(InMemoryEventStore::new())
}

eventfold_core::store_conformance_tests!(memory_store);
eventfold_core::lease_conformance_tests!(memory_store);
