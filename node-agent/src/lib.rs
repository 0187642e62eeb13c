//! The deskvirt node-agent: joins its host to the cluster as a DomainNode, keeps a heartbeat
//! Lease, and turns the Desktops bound to its host into libvirt domains.
#![forbid(unsafe_code)]

pub mod domain;
pub mod hypervisor;
