//! The cheapest filter that does what the Tokensmith filter must do on a cache hit: read
//! the credential header as bytes and overwrite it. `make bench` measures the Tokensmith
//! filter against this floor, so the ratio is the cost of our own work, not of proxy-wasm.
//! Built for wasm32-wasip1 only; on any other target it is empty.

#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
mod filter {
    use proxy_wasm::{
        traits::{Context, HttpContext, RootContext},
        types::{Action, ContextType},
    };

    #[allow(unsafe_code)] // the SDK's entry point: #[no_mangle] _initialize
    mod entry {
        proxy_wasm::main! {{
            proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Warn);
            proxy_wasm::set_root_context(|_| Box::new(super::Root));
        }}
    }

    struct Root;
    impl Context for Root {}
    impl RootContext for Root {
        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
        fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Request))
        }
    }

    struct Request;
    impl Context for Request {}
    impl HttpContext for Request {
        fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
            // Read as bytes (as the real filter does), then replace: one host call each.
            if self
                .get_http_request_header_bytes("authorization")
                .is_some()
            {
                self.set_http_request_header_bytes("authorization", Some(b"Bearer noop"));
            }
            Action::Continue
        }
    }
}
