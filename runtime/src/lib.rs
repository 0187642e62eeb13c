//! What the operator and the node-agent share at run time: logging setup, the health and
//! metrics HTTP server, the API client with its deadlines, watch caches and their throttles, and
//! shutdown on SIGTERM.
#![forbid(unsafe_code)]

pub mod api;
pub mod cache;
pub mod events;
pub mod finalizers;
pub mod health;
pub mod http;
pub mod logging;
pub mod shutdown;
pub mod throttle;
