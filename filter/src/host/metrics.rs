//! Counters defined once per plugin and bumped per request.

use super::abi;
use crate::metrics::Counter;

/// Host metric ids, in `Counter::ALL` order (`None` where the host refused one).
#[derive(Debug, Default, Clone)]
pub(super) struct Metrics {
    ids: Vec<Option<u32>>,
}

impl Metrics {
    /// Defines every counter with the host.
    pub(super) fn define() -> Self {
        let ids = Counter::ALL
            .iter()
            .map(|c| abi::define_counter(c.name()))
            .collect();
        Self { ids }
    }

    /// Adds one to each of `counters`.
    pub(super) fn bump(&self, counters: &[Counter]) {
        for counter in counters {
            if let Some(Some(id)) = self.ids.get(counter.index()) {
                abi::increment(*id);
            }
        }
    }
}
