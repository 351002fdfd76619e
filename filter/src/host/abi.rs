//! The proxy-wasm host calls the filter makes, declared here instead of taken from the
//! SDK's `hostcalls`: those unwrap UTF-8 on header values and gRPC messages and panic on
//! any status they did not expect, and a panic fails the VM for every later request.
//! Every function here returns what the host said, as bytes, and never panics. Only
//! `dispatch_grpc_call` stays with the SDK, which must register the callout.

#![allow(unsafe_code)] // FFI to the host: each call passes pointers to live buffers only.

use std::ptr::null_mut;

/// A host status other than OK (`proxy_wasm::types::Status` numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct HostStatus(pub(super) u32);

/// `NotFound`.
const NOT_FOUND: u32 = 1;
/// `CasMismatch`.
pub(super) const CAS_MISMATCH: u32 = 8;

/// `proxy_wasm::types::MapType::HttpRequestHeaders`.
const REQUEST_HEADERS: u32 = 0;
/// `proxy_wasm::types::StreamType::HttpRequest`.
const HTTP_REQUEST: u32 = 0;

/// Where a buffer is read from (`proxy_wasm::types::BufferType` numbering).
#[derive(Debug, Clone, Copy)]
pub(super) enum Buffer {
    /// The gRPC reply being handled.
    GrpcReceive = 5,
    /// The plugin configuration.
    PluginConfiguration = 7,
}

/// Log levels (`proxy_wasm::types::LogLevel` numbering).
#[derive(Debug, Clone, Copy)]
pub(super) enum Level {
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_log(level: u32, data: *const u8, size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32;
    fn proxy_get_buffer_bytes(
        buffer: u32,
        start: usize,
        max: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(map: u32, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_replace_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_add_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map: u32, key: *const u8, key_size: usize) -> u32;
    fn proxy_send_local_response(
        status: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_continue_stream(stream: u32) -> u32;
    fn proxy_get_status(code: *mut u32, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_get_property(
        path: *const u8,
        path_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key: *const u8,
        key_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
        cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, id: *mut u32) -> u32;
    fn proxy_increment_metric(id: u32, offset: i64) -> u32;
    fn proxy_set_effective_context(context: u32) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
}

fn ok(status: u32) -> Result<(), HostStatus> {
    if status == 0 {
        Ok(())
    } else {
        Err(HostStatus(status))
    }
}

/// Takes ownership of a buffer the host wrote through our allocator.
///
/// # Safety
/// `data`/`size` must come from a host call that just returned OK: the host allocated
/// them with the SDK's `proxy_on_memory_allocate` (a `Vec<u8>` of capacity `size`).
unsafe fn owned(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        // SAFETY: see the function's contract.
        unsafe { Vec::from_raw_parts(data, size, size) }
    }
}

/// Calls a host function that returns a buffer; `NotFound` is `None`.
fn read(call: impl FnOnce(*mut *mut u8, *mut usize) -> u32) -> Result<Option<Vec<u8>>, HostStatus> {
    let (mut data, mut size) = (null_mut(), 0);
    match call(&mut data, &mut size) {
        0 => Ok(Some(unsafe { owned(data, size) })),
        NOT_FOUND => Ok(None),
        status => Err(HostStatus(status)),
    }
}

/// Writes a log line.
pub(super) fn log(level: Level, message: &str) {
    let _ = unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) };
}

/// Unix nanoseconds now.
pub(super) fn now_nanos() -> Option<u64> {
    let mut nanos = 0;
    ok(unsafe { proxy_get_current_time_nanoseconds(&mut nanos) }).ok()?;
    Some(nanos)
}

/// All of a buffer (`None` when absent or refused).
pub(super) fn buffer(which: Buffer, size: usize) -> Option<Vec<u8>> {
    read(|data, len| unsafe { proxy_get_buffer_bytes(which as u32, 0, size, data, len) })
        .ok()
        .flatten()
}

/// The request headers in the host's map encoding.
pub(super) fn request_header_pairs() -> Result<Vec<u8>, HostStatus> {
    read(|data, len| unsafe { proxy_get_header_map_pairs(REQUEST_HEADERS, data, len) })
        .map(Option::unwrap_or_default)
}

/// Sets request header `name` to `value`, replacing any.
pub(super) fn set_request_header(name: &str, value: &str) -> Result<(), HostStatus> {
    ok(unsafe {
        proxy_replace_header_map_value(
            REQUEST_HEADERS,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

/// Adds a request header value.
pub(super) fn add_request_header(name: &str, value: &str) -> Result<(), HostStatus> {
    ok(unsafe {
        proxy_add_header_map_value(
            REQUEST_HEADERS,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

/// Removes every value of request header `name`.
pub(super) fn remove_request_header(name: &str) -> Result<(), HostStatus> {
    ok(unsafe { proxy_remove_header_map_value(REQUEST_HEADERS, name.as_ptr(), name.len()) })
}

/// Answers the client (the effective context's); `headers` in the map encoding.
pub(super) fn send_response(status: u32, headers: &[u8], body: &[u8]) -> Result<(), HostStatus> {
    let details = "tokensmith";
    ok(unsafe {
        proxy_send_local_response(
            status,
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        )
    })
}

/// Makes `context` the one later host calls act on (headers, resume, local response)
/// until this callback returns. A context the host no longer has is `BadArgument`.
pub(super) fn set_effective_context(context: u32) -> Result<(), HostStatus> {
    ok(unsafe { proxy_set_effective_context(context) })
}

/// Sets the root context's tick period (0 stops it); called from any context, it is the
/// root's of this worker.
pub(super) fn set_tick_period(period: std::time::Duration) -> Result<(), HostStatus> {
    let millis = u32::try_from(period.as_millis()).unwrap_or(u32::MAX);
    ok(unsafe { proxy_set_tick_period_milliseconds(millis) })
}

/// Resumes the paused request (the effective context's).
pub(super) fn resume_request() -> Result<(), HostStatus> {
    ok(unsafe { proxy_continue_stream(HTTP_REQUEST) })
}

/// The gRPC status message of the call being handled, as bytes.
pub(super) fn grpc_message() -> Option<Vec<u8>> {
    let mut code = 0;
    read(|data, len| unsafe { proxy_get_status(&mut code, data, len) })
        .ok()
        .flatten()
}

/// A host property, e.g. `["plugin_name"]` (`None` when absent or refused).
pub(super) fn property(path: &[&str]) -> Option<Vec<u8>> {
    let path = path.join("\0");
    read(|data, len| unsafe { proxy_get_property(path.as_ptr(), path.len(), data, len) })
        .ok()
        .flatten()
}

/// A shared-data value and its CAS token (`(None, None)` when absent).
pub(super) fn shared_data(key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), HostStatus> {
    let mut cas = 0;
    let value = read(|data, len| unsafe {
        proxy_get_shared_data(key.as_ptr(), key.len(), data, len, &mut cas)
    })?;
    Ok((value, (cas != 0).then_some(cas)))
}

/// Writes shared data if `cas` still names the current value (0: unconditionally).
pub(super) fn set_shared_data(key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostStatus> {
    ok(unsafe {
        proxy_set_shared_data(
            key.as_ptr(),
            key.len(),
            value.as_ptr(),
            value.len(),
            cas.unwrap_or(0),
        )
    })
}

/// Defines a counter.
pub(super) fn define_counter(name: &str) -> Option<u32> {
    let mut id = 0;
    ok(unsafe { proxy_define_metric(0, name.as_ptr(), name.len(), &mut id) }).ok()?;
    Some(id)
}

/// Adds one to a counter.
pub(super) fn increment(id: u32) {
    let _ = unsafe { proxy_increment_metric(id, 1) };
}
