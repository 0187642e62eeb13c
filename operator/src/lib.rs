//! The deskvirt operator: places Desktops on hosts, allocates SPICE ports, MACs and subnets,
//! tracks host health and keeps pool accounting.
#![forbid(unsafe_code)]

pub mod allocators;
pub mod scheduler;
