//! The only module that names `proxy_wasm`: the root context (configuration, metrics),
//! the per-request HTTP context, and shared data as the cache's slot store. Each
//! callback gathers facts, asks `flow`, and carries out the `Step`.

mod http;
mod metrics;
mod root;
mod shared_data;

use proxy_wasm::{hostcalls, types::LogLevel};

#[allow(unsafe_code)] // the SDK's entry point: #[no_mangle] _initialize
mod entry {
    proxy_wasm::main! {{
        proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
        proxy_wasm::set_root_context(|_| Box::new(super::root::Root::default()));
    }}
}

/// Logs `message` for context `id`. Callers never pass header values.
fn log(level: LogLevel, id: u32, message: &str) {
    let _ = hostcalls::log(level, &format!("tokensmith #{id}: {message}"));
}

/// Unix seconds now, from the host clock.
fn now() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}
