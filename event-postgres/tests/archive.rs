//! Archiving is not implemented on PostgreSQL yet: it says so with a typed error, and
//! neither the store nor the file system is touched.

mod common;

use eventfold_core::archive::{self, ArchiveRange};
use eventfold_core::{ArchiveStore, Error, EventLog, ExpectedVersion};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archiving_on_postgresql_is_unsupported_and_changes_nothing() {
    if common::no_server() {
        return;
    }
    let schema = common::Schema::new();
    let store = schema.open().await;
    store
        .append(
            &common::stream("a"),
            ExpectedVersion::NoStream,
            vec![common::event(1)],
        )
        .await
        .unwrap();
    let path = std::env::temp_dir().join(format!("eventfold-pg-archive-{}.gz", schema.name));
    let error = archive::export(
        &store,
        ArchiveRange::BelowPosition(10),
        &path,
        &mut archive::no_progress,
    )
    .await
    .unwrap_err();
    match &error {
        Error::Unsupported { operation, store } => {
            assert!(store.contains("PostgreSQL"), "{error}");
            assert!(!operation.is_empty(), "{error}");
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    assert!(!path.exists(), "no archive file is left behind");
    assert!(matches!(
        store.archive_horizon().await,
        Err(Error::Unsupported { .. })
    ));
    assert!(matches!(
        store.read_stored(1, 10).await,
        Err(Error::Unsupported { .. })
    ));
    assert_eq!(store.read_all(1, 10).await.unwrap().len(), 1);
    store.close().await.unwrap();
}
