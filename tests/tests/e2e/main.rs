//! End-to-end tests: one test binary, one module per component under test.

mod architecture;
mod bench;
mod companion;
mod deploy;
mod doctor;
mod envoy;
mod fake_apiserver;
mod faults;
mod filter;
mod inprocess;
mod istio;
mod jwks;
mod kubectl;
mod production;
mod wasmplugin;
