//! The root context: parses and validates the plugin configuration (refusing to start
//! on a bad one), defines the counters, and creates one HTTP context per request.

use std::rc::Rc;

use proxy_wasm::{
    hostcalls,
    traits::{Context, HttpContext, RootContext},
    types::{BufferType, ContextType, LogLevel},
};

use super::{http::RequestContext, log, metrics::Metrics};
use crate::config::Config;

/// Per-plugin state shared by its requests.
#[derive(Default)]
pub(super) struct Root {
    config: Option<Rc<Config>>,
    metrics: Rc<Metrics>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _: usize) -> bool {
        log(
            LogLevel::Info,
            0,
            concat!("filter ", env!("CARGO_PKG_VERSION"), " loaded"),
        );
        true
    }

    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default();
        match Config::parse(&bytes) {
            Ok(config) => {
                self.config = Some(Rc::new(config));
                self.metrics = Rc::new(Metrics::define());
                true
            }
            Err(error) => {
                // Returning false makes Envoy refuse the plugin: fail closed.
                log(LogLevel::Critical, 0, &error.to_string());
                false
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let config = self.config.clone()?;
        Some(Box::new(RequestContext::new(
            context_id,
            config,
            self.metrics.clone(),
        )))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
