//! Keeps this host ready to take in desktops moved live (`--migration-uri` set): as soon as the
//! operator gave the host a pool and a subnet, the pool's network is defined here, before any
//! desktop of the pool runs here, so a domain moving in finds the network its NIC names. Only
//! then does the host publish its migration endpoint, so the operator never picks it earlier.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;

use super::context::DesktopContext;
use super::ip::{self, Pending};
use crate::hypervisor::Hypervisor;

/// Looks every `every` until the future is dropped; returns at once on a host that takes in
/// no migrations.
pub async fn run<H: Hypervisor>(ctx: Arc<DesktopContext<H>>, every: Duration) {
    if !ctx.config.takes_migrations {
        return;
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut said = None;
    loop {
        tick.tick().await;
        let pool = ctx
            .domain_node()
            .and_then(|n| n.status.as_ref().and_then(|s| s.pool.clone()))
            .and_then(|p| ctx.pool(&p));
        let Some(pool) = pool else { continue };
        let why = match ip::ensure(&ctx, &pool).await {
            Ok(()) => {
                ctx.config
                    .inbound_ready
                    .send_if_modified(|r| !std::mem::replace(r, true));
                None
            }
            Err(Pending::Wait(c)) => Some(c.message),
            Err(Pending::Failed(e)) => Some(e.to_string()),
        };
        if why != said {
            if let Some(w) = &why {
                tracing::warn!(why = %w, "the pool's network is not ready for desktops moving in");
            }
            said = why;
        }
    }
}
