//! Pure two-level placement: a desktop names a pool, the pool's hosts are filtered (health, CPU,
//! dedicated CPUs, memory, hugepages, a free SPICE port) and weighed (Spread or Pack), and a
//! failure comes back as a closed set of reasons. Also the capacity arithmetic behind a pool's
//! status. Values in, values out; no Kubernetes calls.
//!
//! A controller reads a [`PoolIndex`], builds one [`HostView`] per DomainNode (with the ledger's
//! port counts), turns the Desktop's spec into a [`Request`] and calls [`schedule`].

pub mod bench;
pub mod capacity;
pub mod charges;
pub mod cpu_model;
pub mod filter;
pub mod host;
pub mod place;
pub mod policy;
pub mod pool_capacity;
pub mod pools;
pub mod request;
pub mod unschedulable;
pub mod weigh;

pub use capacity::{FactsError, Free, HostCapacity, HostFacts, Shortfalls, Usage};
pub use charges::ChargeIndex;
pub use cpu_model::CpuModel;
pub use host::{HostReport, HostView};
pub use place::{Decision, place_in_pool, place_in_pool_where, schedule};
pub use policy::{PolicyError, PolicySpec, PoolPolicy, Ratio, ReferenceDesktop};
pub use pool_capacity::{HostTotals, PoolCapacity, Totals};
pub use pools::PoolIndex;
pub use request::{Request, RequestError};
pub use unschedulable::{FitReport, Unschedulable};
