//! The deskvirt node-agent: joins its host to the cluster as a DomainNode, keeps a heartbeat
//! Lease, and turns the Desktops bound to its host into libvirt domains.
#![forbid(unsafe_code)]

pub mod agent;
pub mod backup_files;
pub mod config;
pub mod desktops;
pub mod disks;
pub mod domain;
pub mod heartbeat;
pub mod host_memory;
pub mod hypervisor;
pub mod inventory;
pub mod metrics;
pub mod paths;
pub mod registration;
