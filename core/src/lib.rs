//! deskvirt's decisions without Kubernetes: where a desktop goes and what it is given (scheduler,
//! allocators, capacity), what phase and conditions follow from what was observed, what the idle
//! policy does, and the plain values both binaries share. No kube, k8s-openapi or tokio:
//! everything here is a pure function of its inputs, tested with builders.
#![forbid(unsafe_code)]

pub mod allocators;
pub mod backup;
pub mod drain;
pub mod idle;
pub mod images;
pub mod migration;
pub mod names;
pub mod phase;
pub mod pinning;
pub mod quantity;
pub mod reasons;
pub mod repair;
pub mod resize;
pub mod scheduler;
pub mod spice;
pub mod types;
pub mod usb;
pub mod valid;
