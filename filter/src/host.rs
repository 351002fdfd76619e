//! The only module that names `proxy_wasm`: the root context (configuration, metrics,
//! the Checks that must outlive a request), the per-request HTTP context, and shared
//! data as the cache's slot store. Each callback gathers facts, asks `flow`, and carries
//! out the `Step`. Host calls go through `abi`, which never panics on what the host
//! returns.

mod abi;
mod http;
mod metrics;
mod root;
mod shared_data;

use abi::Level;

#[allow(unsafe_code)] // the SDK's entry point: #[no_mangle] _initialize
mod entry {
    proxy_wasm::main! {{
        proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
        proxy_wasm::set_root_context(|_| Box::new(super::root::Root::default()));
    }}
}

/// Logs `message` for context `id`. Callers never pass header values.
fn log(level: Level, id: u32, message: &str) {
    abi::log(level, &format!("tokensmith #{id}: {message}"));
}

/// Unix seconds now, from the host clock.
fn now() -> u64 {
    now_ms() / 1000
}

/// Unix milliseconds now, from the host clock.
fn now_ms() -> u64 {
    abi::now_nanos().map_or(0, |n| n / 1_000_000)
}
