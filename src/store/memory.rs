//! A store that keeps nothing: messages are sequenced and broadcast but not persisted.
//! Used until the SQLite store lands, and by tests of the broadcast path.

use super::{Committed, Store, StoreError};

/// Accepts every batch and forgets it.
#[derive(Debug, Default)]
pub struct MemoryStore;

impl Store for MemoryStore {
    fn commit(&mut self, _batch: &[Committed]) -> Result<(), StoreError> {
        Ok(())
    }
}
