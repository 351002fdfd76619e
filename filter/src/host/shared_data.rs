//! Proxy-wasm shared data (shared by all workers of the VM) as the cache's slot store,
//! under one plugin's scope.

use super::abi;
use crate::cache::{self, SlotStore, StoreError};

/// The host's shared data, slots of `scope`.
pub(super) struct SharedData {
    pub(super) scope: String,
}

impl SlotStore for SharedData {
    fn load(&self, slot: u32) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        abi::shared_data(&cache::key(&self.scope, slot)).map_err(|_| StoreError::Host)
    }

    fn store(&self, slot: u32, bytes: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        match abi::set_shared_data(&cache::key(&self.scope, slot), bytes, cas) {
            Ok(()) => Ok(()),
            Err(abi::HostStatus(abi::CAS_MISMATCH)) => Err(StoreError::CasMismatch),
            Err(_) => Err(StoreError::Host),
        }
    }
}
