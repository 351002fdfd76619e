//! Proxy-wasm shared data (shared by all workers of the VM) as the cache's slot store.

use proxy_wasm::{hostcalls, types::Status};

use crate::cache::{self, SlotStore, StoreError};

/// The host's shared data.
pub(super) struct SharedData;

impl SlotStore for SharedData {
    fn load(&self, slot: u32) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        hostcalls::get_shared_data(&cache::key(slot)).map_err(|_| StoreError::Host)
    }

    fn store(&self, slot: u32, bytes: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        match hostcalls::set_shared_data(&cache::key(slot), Some(bytes), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(_) => Err(StoreError::Host),
        }
    }
}
