//! The deskvirt operator: places Desktops on hosts, allocates SPICE ports, MACs and subnets,
//! tracks host health and keeps pool accounting.
#![forbid(unsafe_code)]

pub mod charges;
pub mod coalesce;
pub mod config;
pub mod console;
pub mod context;
pub mod controllers;
pub mod fence;
pub mod heartbeat;
pub mod idle;
pub mod leader;
pub mod metrics;
pub mod operator;
pub mod sweep;
pub mod tenancy;
pub mod world;

/// The pure allocators, scheduler and duplicate repair, from the kube-free core.
pub use deskvirt_core::{allocators, repair, scheduler};
