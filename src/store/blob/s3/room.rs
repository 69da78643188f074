//! Room for the bytes S3 writers hold before they send them: a writer
//! keeps up to one 8 MiB part in memory, and a store daemon may have as
//! many writers as its clients open Puts, so without a bound its memory
//! would follow its clients. Two pools keep it bounded without deadlock:
//! every writer takes one MiB of the small pool before it buffers
//! anything, and a writer that grows past that MiB takes the rest of a
//! part from the large pool in one go. A writer never waits for the small
//! pool while holding anything, and holders of the large pool need nothing
//! more, so they always finish and give their room back. A writer that
//! finds no room within the store timeout fails with RESOURCE_EXHAUSTED
//! (a busy daemon: a failover client tries the next one).
use crate::store::{Error, Result};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes of one unit of room.
pub(super) const UNIT: usize = 1 << 20;
/// Writers that may buffer up to one MiB at once.
const SMALL_UNITS: usize = 128;
/// MiB for writers past their first: room for 32 whole parts.
const LARGE_UNITS: usize = 32 * 7;

pub(super) struct Room {
    small: Arc<Semaphore>,
    large: Arc<Semaphore>,
    /// How long a writer may wait for room.
    wait: Duration,
}

impl Room {
    pub(super) fn new(wait: Duration) -> Arc<Room> {
        Self::with_units(SMALL_UNITS, LARGE_UNITS, wait)
    }

    pub(super) fn with_units(small: usize, large: usize, wait: Duration) -> Arc<Room> {
        Arc::new(Room {
            small: Arc::new(Semaphore::new(small)),
            large: Arc::new(Semaphore::new(large)),
            wait,
        })
    }
}

/// What one writer holds.
#[derive(Default)]
pub(super) struct Held {
    small: Option<OwnedSemaphorePermit>,
    large: Option<OwnedSemaphorePermit>,
}

impl Held {
    /// Makes room for a buffer of `len` bytes out of a part of `part`.
    pub(super) async fn ensure(&mut self, room: &Room, len: usize, part: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.small.is_none() {
            self.small = Some(take(room, &room.small, 1, "the small pool").await?);
        }
        if len > UNIT && self.large.is_none() {
            let units = part.div_ceil(UNIT).saturating_sub(1).max(1) as u32;
            self.large = Some(take(room, &room.large, units, "the large pool").await?);
        }
        Ok(())
    }
}

async fn take(
    room: &Room,
    pool: &Arc<Semaphore>,
    units: u32,
    which: &str,
) -> Result<OwnedSemaphorePermit> {
    match tokio::time::timeout(room.wait, pool.clone().acquire_many_owned(units)).await {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(_)) => Err(Error::ResourceExhausted(format!(
            "uploads to the bucket: {which} is closed"
        ))),
        Err(_) => Err(Error::ResourceExhausted(format!(
            "uploads to the bucket: no room in {which} for {:?} (too many uploads buffering)",
            room.wait
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writers_wait_for_room_and_a_full_pool_fails_after_the_wait() {
        let room = Room::with_units(2, 7, Duration::from_millis(200));
        let (mut a, mut b, mut c) = (Held::default(), Held::default(), Held::default());
        a.ensure(&room, 10, 8 * UNIT).await.unwrap();
        b.ensure(&room, 10, 8 * UNIT).await.unwrap();
        // a third small writer: no room
        let e = c.ensure(&room, 10, 8 * UNIT).await.unwrap_err();
        assert!(e.to_string().contains("small pool"), "{e}");
        // one grows to a whole part; the other cannot
        a.ensure(&room, 3 * UNIT, 8 * UNIT).await.unwrap();
        let e = b.ensure(&room, 2 * UNIT, 8 * UNIT).await.unwrap_err();
        assert!(e.to_string().contains("large pool"), "{e}");
        // a writer done gives its room back
        drop(a);
        b.ensure(&room, 2 * UNIT, 8 * UNIT).await.unwrap();
        c.ensure(&room, 10, 8 * UNIT).await.unwrap();
    }
}
