//! The deskvirt node-agent: joins its host to the cluster as a DomainNode, keeps a heartbeat
//! Lease, turns the Desktops bound to its host into libvirt domains, and copies the
//! DesktopImages of its pool onto the host.
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
pub mod images;
pub mod inventory;
pub mod metrics;
pub mod paths;
pub mod registration;
