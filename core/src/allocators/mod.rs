//! Pure allocators: which SPICE port, MAC and host subnet each desktop or host of a pool holds,
//! and the per-pool [`Ledger`] that combines them. Values in, values out; no Kubernetes calls.

pub mod conflict;
pub mod fnv;
pub mod ledger;
pub mod macs;
pub mod ports;
pub mod subnets;

pub use conflict::{Conflict, Resource, Seniority};
pub use ledger::{
    Bound, Claim, DesktopBinding, Ledger, LedgerConfig, LedgerError, NetworkSpec, Released, Target,
};
pub use macs::{Mac, MacError, MacPrefix};
pub use ports::PortError;
pub use subnets::{HostSubnet, Ipv4Net, SubnetBinding, SubnetError, SubnetPlan};
