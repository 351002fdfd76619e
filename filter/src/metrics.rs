//! The filter's counters (Envoy lists them as `wasmcustom.tokensmith.*`).

/// One counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// Every request the filter saw.
    Requests,
    /// Answered from the in-proxy cache, without a Check.
    CacheHits,
    /// A cacheable token not in the cache (or stale): a Check followed.
    CacheMisses,
    /// Forwarded with an exchanged token.
    Allowed,
    /// Answered with a denial (from the companion, or a missing token).
    Denied,
    /// The companion could not be asked or answered nonsense; `failure_mode` applied.
    Errors,
    /// For a host outside `hosts`: passed on untouched.
    OtherHost,
    /// Background Checks sent for cached entries past their refresh point (at most one
    /// per token per worker at a time).
    CacheRefreshes,
    /// Background Checks that could not be sent, failed, timed out or were answered with
    /// anything but an allow or a 401/403: the entry is left to end on time.
    CacheRefreshErrors,
    /// Background Checks answered 401/403: the entry was removed.
    CacheRefreshDenied,
    /// Misses that waited for the Check another request on the same worker sent for the
    /// same token, instead of sending their own.
    CoalescedWaits,
}

impl Counter {
    /// Every counter, in the order the host defines them.
    pub const ALL: [Counter; 11] = [
        Counter::Requests,
        Counter::CacheHits,
        Counter::CacheMisses,
        Counter::Allowed,
        Counter::Denied,
        Counter::Errors,
        Counter::OtherHost,
        Counter::CacheRefreshes,
        Counter::CacheRefreshErrors,
        Counter::CacheRefreshDenied,
        Counter::CoalescedWaits,
    ];

    /// The metric name.
    pub fn name(self) -> &'static str {
        match self {
            Counter::Requests => "tokensmith.requests",
            Counter::CacheHits => "tokensmith.cache_hits",
            Counter::CacheMisses => "tokensmith.cache_misses",
            Counter::Allowed => "tokensmith.allowed",
            Counter::Denied => "tokensmith.denied",
            Counter::Errors => "tokensmith.errors",
            Counter::OtherHost => "tokensmith.other_host",
            Counter::CacheRefreshes => "tokensmith.cache_refreshes",
            Counter::CacheRefreshErrors => "tokensmith.cache_refresh_errors",
            Counter::CacheRefreshDenied => "tokensmith.cache_refresh_denied",
            Counter::CoalescedWaits => "tokensmith.coalesced_waits",
        }
    }

    /// Position in [`Counter::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}
