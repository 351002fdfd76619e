//! Envoy's ext_authz v3 messages, written from upstream's .proto files with the same
//! package names, message names and field numbers (each .proto file says what it leaves
//! out), plus the demo greet service. gRPC code is generated with feature `grpc`.

/// Tokensmith's key in an OK `CheckResponse.dynamic_metadata`: how many seconds a proxy
/// may reuse the answer (a number; the wire contract between companion and filter).
pub const REUSE_METADATA_KEY: &str = "tokensmith_reuse_s";

/// The encoded `FileDescriptorSet` of every compiled .proto file.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

/// Packages under `envoy.`.
pub mod envoy {
    /// `envoy.config.*`
    pub mod config {
        /// `envoy.config.core.*`
        pub mod core {
            /// `envoy.config.core.v3`
            #[allow(missing_docs, clippy::all, clippy::pedantic)]
            pub mod v3 {
                include!(concat!(env!("OUT_DIR"), "/envoy.config.core.v3.rs"));
            }
        }
    }
    /// `envoy.service.*`
    pub mod service {
        /// `envoy.service.auth.*`
        pub mod auth {
            /// `envoy.service.auth.v3`
            #[allow(missing_docs, clippy::all, clippy::pedantic)]
            pub mod v3 {
                include!(concat!(env!("OUT_DIR"), "/envoy.service.auth.v3.rs"));
            }
        }
    }
    /// `envoy.type.*`
    pub mod r#type {
        /// `envoy.type.v3`
        #[allow(missing_docs, clippy::all, clippy::pedantic)]
        pub mod v3 {
            include!(concat!(env!("OUT_DIR"), "/envoy.r#type.v3.rs"));
        }
    }
}

/// Packages under `google.`.
pub mod google {
    /// `google.rpc`
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod rpc {
        include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
    }
}

/// Packages under `tokensmith.`.
pub mod tokensmith {
    /// `tokensmith.greet.*`
    pub mod greet {
        /// `tokensmith.greet.v1`: the demo service.
        #[allow(missing_docs, clippy::all, clippy::pedantic)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/tokensmith.greet.v1.rs"));
        }
    }
}

#[cfg(test)]
mod tests;
