//! The root context: parses and validates the plugin configuration (refusing to start
//! on a bad one), defines the counters, scopes the cache, and creates one HTTP context
//! per request.

use std::rc::Rc;

use proxy_wasm::{
    traits::{Context, HttpContext, RootContext},
    types::ContextType,
};

use super::{
    abi::{self, Buffer, Level},
    http::RequestContext,
    log,
    metrics::Metrics,
    shared_data::SharedData,
};
use crate::{cache, check, config::Config};

/// What every request of one configured plugin shares.
pub(super) struct Plugin {
    pub(super) config: Config,
    /// The `dispatch_grpc_call` target: a serialized GrpcService.
    pub(super) upstream: String,
    pub(super) cache: SharedData,
    pub(super) metrics: Metrics,
}

/// The root context of one plugin.
#[derive(Default)]
pub(super) struct Root {
    plugin: Option<Rc<Plugin>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _: usize) -> bool {
        log(
            Level::Info,
            0,
            concat!("filter ", env!("CARGO_PKG_VERSION"), " loaded"),
        );
        true
    }

    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = abi::buffer(Buffer::PluginConfiguration, size).unwrap_or_default();
        let config = match Config::parse(&bytes) {
            Ok(config) => config,
            Err(error) => {
                // Returning false makes Envoy refuse the plugin: fail closed.
                log(Level::Critical, 0, &error.to_string());
                return false;
            }
        };
        if config.hosts.is_none() {
            log(
                Level::Warn,
                0,
                "no `hosts` set: every request through this proxy is exchanged or refused, \
                 whatever its host; set `hosts` on a shared gateway",
            );
        }
        let name = abi::property(&["plugin_name"]).unwrap_or_default();
        let root_id = abi::property(&["plugin_root_id"]).unwrap_or_default();
        let cache = SharedData {
            scope: cache::scope(&name, &root_id, &bytes),
        };
        retire_previous_scope(&name, &root_id, &cache.scope, config.cache.slots);
        self.plugin = Some(Rc::new(Plugin {
            upstream: check::grpc_service(&config),
            config,
            cache,
            metrics: Metrics::define(),
        }));
        true
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let plugin = self.plugin.clone()?;
        Some(Box::new(RequestContext::new(context_id, plugin)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Records `scope` (with its slot count) as this plugin's current one and empties the
/// slots of the one it replaces, so a reconfigured plugin leaves no stale entries.
fn retire_previous_scope(name: &[u8], root_id: &[u8], scope: &str, slots: u32) {
    let key = format!("tokensmith.{}.scope", cache::scope(name, root_id, b""));
    let current = format!("{scope} {slots}");
    let Ok((previous, cas)) = abi::shared_data(&key) else {
        return;
    };
    let previous = previous.unwrap_or_default();
    if previous == current.as_bytes()
        || abi::set_shared_data(&key, current.as_bytes(), cas).is_err()
    {
        return;
    }
    let previous = String::from_utf8_lossy(&previous);
    if let Some((old, old_slots)) = previous.split_once(' ')
        && let Ok(old_slots) = old_slots.parse()
    {
        cache::clear(
            &SharedData {
                scope: old.to_owned(),
            },
            old_slots,
        );
    }
}
