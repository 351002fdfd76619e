//! The root context: parses and validates the plugin configuration (refusing to start
//! on a bad one), defines the counters, scopes the cache, and creates one HTTP context
//! per request. On its tick it sends the Checks that must outlive a request (background
//! refreshes, misses whose first request went away), so their replies come back here.

use std::{cell::RefCell, rc::Rc, time::Duration};

use proxy_wasm::{
    traits::{Context, HttpContext, RootContext},
    types::ContextType,
};

use super::{
    abi::{self, Buffer, Level},
    http::{RequestContext, answer, dispatch, reply_body},
    log,
    metrics::Metrics,
    now, now_ms,
    shared_data::SharedData,
};
use crate::{
    cache, check,
    config::Config,
    flights::{Call, Flights, Job},
    flow,
    metrics::Counter,
};

/// How soon the root's tick runs once work is queued for it. Armed only while there is
/// some, and stopped on the tick that takes it.
const TICK: Duration = Duration::from_millis(1);

/// What every request of one configured plugin shares (on one worker: each worker has
/// its own VM, so its own `Plugin`).
pub(super) struct Plugin {
    pub(super) config: Config,
    /// The `dispatch_grpc_call` target: a serialized GrpcService.
    pub(super) upstream: String,
    pub(super) cache: SharedData,
    pub(super) metrics: Metrics,
    /// This worker's coalesced misses and background refreshes.
    pub(super) flights: RefCell<Flights>,
}

impl Plugin {
    /// Arms the root's tick when work is queued for it and none is armed.
    pub(super) fn wake_root(&self) {
        if self.flights.borrow_mut().arm()
            && let Err(e) = abi::set_tick_period(TICK)
        {
            self.flights.borrow_mut().disarm();
            log(Level::Error, 0, &format!("cannot arm the tick ({e:?})"));
        }
    }
}

/// The root context of one plugin.
#[derive(Default)]
pub(super) struct Root {
    plugin: Option<Rc<Plugin>>,
}

impl Root {
    /// Sends one job's Check from here, the root, so its reply comes back here.
    fn run(plugin: &Plugin, job: Job) {
        match job {
            Job::Refresh {
                digest,
                pending,
                check,
            } => match dispatch(plugin, &check) {
                Ok(token) => {
                    plugin
                        .flights
                        .borrow_mut()
                        .sent(token, Call::Refresh { digest, pending });
                    plugin.metrics.bump(&[Counter::CacheRefreshes]);
                }
                Err(status) => {
                    log(
                        Level::Warn,
                        0,
                        &format!("cannot send a background refresh ({status:?})"),
                    );
                    plugin.flights.borrow_mut().refresh_done(&digest);
                    plugin.metrics.bump(&[Counter::CacheRefreshErrors]);
                }
            },
            Job::Ask {
                digest,
                expired,
                check,
            } => {
                let failure = flow::on_dispatch_failure(&plugin.config);
                for waiter in expired {
                    answer(plugin, waiter.context, failure.clone());
                }
                let Some(check) = check else {
                    return;
                };
                match dispatch(plugin, &check) {
                    Ok(token) => plugin.flights.borrow_mut().sent(token, Call::Miss(digest)),
                    Err(status) => {
                        log(
                            Level::Error,
                            0,
                            &format!("cannot call the companion ({status:?})"),
                        );
                        let waiters = plugin.flights.borrow_mut().settle_root(&digest);
                        for waiter in waiters {
                            answer(plugin, waiter.context, failure.clone());
                        }
                    }
                }
            }
        }
    }
}

impl Context for Root {
    fn on_grpc_call_response(&mut self, token: u32, status: u32, size: usize) {
        let Some(plugin) = self.plugin.clone() else {
            return;
        };
        let Some(call) = plugin.flights.borrow_mut().answered(token) else {
            return;
        };
        let body = reply_body(0, status, size);
        match call {
            Call::Refresh { digest, pending } => {
                let counters = flow::on_refresh_reply(
                    &plugin.config,
                    &pending,
                    status,
                    body.as_deref(),
                    &plugin.cache,
                    now(),
                );
                plugin.flights.borrow_mut().refresh_done(&digest);
                plugin.metrics.bump(&counters);
            }
            Call::Miss(digest) => {
                let waiters = plugin.flights.borrow_mut().settle_root(&digest);
                let Some(first) = waiters.first() else {
                    return;
                };
                let decision = flow::on_check_reply(
                    &plugin.config,
                    &first.pending,
                    status,
                    body.as_deref(),
                    &plugin.cache,
                    now(),
                );
                for waiter in waiters {
                    answer(&plugin, waiter.context, decision.clone());
                }
            }
        }
    }
}

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
            flights: RefCell::default(),
        }));
        true
    }

    fn on_tick(&mut self) {
        // One tick per wake-up: the next queued job arms it again.
        if let Err(e) = abi::set_tick_period(Duration::ZERO) {
            log(Level::Error, 0, &format!("cannot stop the tick ({e:?})"));
        }
        let Some(plugin) = self.plugin.clone() else {
            return;
        };
        let jobs = plugin.flights.borrow_mut().take_jobs(now_ms());
        for job in jobs {
            Self::run(&plugin, job);
        }
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
