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
}

impl Counter {
    /// Every counter, in the order the host defines them.
    pub const ALL: [Counter; 7] = [
        Counter::Requests,
        Counter::CacheHits,
        Counter::CacheMisses,
        Counter::Allowed,
        Counter::Denied,
        Counter::Errors,
        Counter::OtherHost,
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
        }
    }

    /// Position in [`Counter::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}
