//! The head watch across processes: one listener connection that `LISTEN`s on the store's
//! channel (each commit's NOTIFY carries the new head), and a timer that reads the head,
//! since notifications sent while the listener is disconnected (or turned off) are lost.
//! After every (re)connection the head is read again.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, NoTls};

use crate::sql;

/// Moves the watch to `head` if that is further.
pub(crate) fn publish(watch: &watch::Sender<u64>, head: u64) {
    watch.send_if_modified(|published| {
        let moved = head > *published;
        if moved {
            *published = head;
        }
        moved
    });
}

/// What the listener needs.
pub(crate) struct Listener {
    pub(crate) config: tokio_postgres::Config,
    pub(crate) channel: Option<String>,
    pub(crate) pool: deadpool_postgres::Pool,
    pub(crate) head: Arc<watch::Sender<u64>>,
    pub(crate) poll: Duration,
    /// Ends the listener when it changes or its sender is dropped (the store closed).
    pub(crate) stop: watch::Receiver<bool>,
}

impl Listener {
    /// Reads the head through the store's lease pool (never behind the main pool's
    /// readers) and publishes it.
    async fn poll_head(&self) {
        let read = async {
            let client = self.pool.get().await.ok()?;
            let row = client.query_one(sql::HEAD, &[]).await.ok()?;
            row.try_get::<_, i64>(0).ok()
        };
        if let Some(head) = read.await {
            publish(&self.head, head.max(0) as u64);
        }
    }

    /// Connects, sends `LISTEN`, and forwards notifications until the connection ends;
    /// `None` when that fails. The client keeps the connection open.
    async fn listen(
        &self,
        channel: &str,
    ) -> Option<(tokio_postgres::Client, mpsc::UnboundedReceiver<u64>)> {
        let (client, mut connection) = match self.config.connect(NoTls).await {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "the PostgreSQL listener cannot connect");
                return None;
            }
        };
        let (notes, received) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(note))) => {
                        if let Ok(head) = note.payload().parse::<u64>()
                            && notes.send(head).is_err()
                        {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return,
                }
            }
        });
        // The channel is `ef_events_` and a checked schema name: a plain identifier.
        if let Err(e) = client.batch_execute(&format!("LISTEN {channel}")).await {
            tracing::debug!(error = %e, "the PostgreSQL listener cannot LISTEN");
            return None;
        }
        Some((client, received))
    }

    pub(crate) async fn run(self) {
        let mut stop = self.stop.clone();
        let mut tick = tokio::time::interval(self.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let listening = match &self.channel {
                Some(channel) => self.listen(channel).await,
                None => None,
            };
            // Without a listener that should be there, try again at the next tick.
            let retry = self.channel.is_some() && listening.is_none();
            let (_client, mut notes) = match listening {
                Some((client, notes)) => (Some(client), Some(notes)),
                None => (None, None),
            };
            // Notifications sent while disconnected are lost: read the head now.
            self.poll_head().await;
            loop {
                tokio::select! {
                    note = async { notes.as_mut()?.recv().await }, if notes.is_some() => match note {
                        Some(head) => publish(&self.head, head),
                        // The connection ended: connect again.
                        None => break,
                    },
                    _ = tick.tick() => {
                        self.poll_head().await;
                        if retry {
                            break;
                        }
                    }
                    _ = stop.changed() => return,
                }
            }
        }
    }
}
