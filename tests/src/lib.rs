//! Test harness for the cluster and end-to-end tiers: finds (or starts) the real local control
//! plane, installs the CRDs, and gives tests a client, unique namespaces and `kubectl`.
#![forbid(unsafe_code)]

pub mod apimetrics;
pub mod cluster;
pub mod confined;
pub mod helm;
pub mod host;
pub mod images;
pub mod kubectl;
pub mod moves;
pub mod origin;
pub mod previous;
pub mod second_host;
pub mod spice;
pub mod world;
