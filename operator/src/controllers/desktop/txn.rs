//! The ledger transaction of a bound desktop's pass: the one hold of the ledger lock under which
//! the plan makes every allocation of the pass (a rebind, a duplicate repaired, a port moved off
//! a busy one, a woken desktop's port, an admitted resize), and what goes back, in one step,
//! when the commit that follows fails.

use std::sync::Arc;

use deskvirt_crds::ResourcePool;

use crate::allocators::Ledger;
use crate::charges::Counted;
use crate::context::{Context, Ledgers, Stores};
use crate::fence::{self, Fenced};

/// Why the pool's ledger is not open to this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Closed {
    /// Not rebuilt since leadership was gained: ask again in a moment.
    NotReady,
    /// The desktop's pool does not exist.
    NoPool,
    /// The pool's allocation settings are rejected (the pool's own condition says so).
    Invalid(String),
}

/// The pool's ledger, held for one plan.
pub(super) struct Txn<'a> {
    ledgers: &'a mut Ledgers,
    stores: &'a Stores,
    pool_name: String,
    pool: Option<Arc<ResourcePool>>,
    closed: Option<Closed>,
    /// A port this transaction reserved for the desktop: it goes back if the commit fails.
    reserved: bool,
}

impl<'a> Txn<'a> {
    /// Opens the ledger of `pool` (rebuilding it on first use), unless the fence lapsed while
    /// the pass waited for the lock: then nothing may be allocated or written.
    pub fn begin(ledgers: &'a mut Ledgers, stores: &'a Stores, pool: &str) -> Result<Self, Fenced> {
        fence::check()?;
        let found = stores.pool(pool);
        let closed = match &found {
            _ if !ledgers.ready => Some(Closed::NotReady),
            None => Some(Closed::NoPool),
            Some(p) => ledgers
                .of(p, stores)
                .err()
                .map(|e| Closed::Invalid(e.to_string())),
        };
        Ok(Self {
            ledgers,
            stores,
            pool_name: pool.to_string(),
            pool: found,
            closed,
            reserved: false,
        })
    }

    /// Why the pool's ledger cannot be used, if it cannot.
    pub fn closed(&self) -> Option<&Closed> {
        self.closed.as_ref()
    }

    /// The desktop's pool, as the cache holds it.
    pub fn pool(&self) -> Option<&Arc<ResourcePool>> {
        self.pool.as_ref()
    }

    /// The pool's ledger, when open.
    pub fn ledger(&mut self) -> Option<&mut Ledger> {
        if self.closed.is_some() {
            return None;
        }
        self.ledgers.get_mut(&self.pool_name)
    }

    /// The pool's ledger as it stands, also while the pool's allocation settings are
    /// rejected (it keeps the last accepted ones): for what only follows what the host
    /// reported or the status recorded (a busy port moved, a resize settled).
    pub fn existing(&mut self) -> Option<&mut Ledger> {
        if self.closed == Some(Closed::NotReady) {
            return None;
        }
        self.ledgers.get_mut(&self.pool_name)
    }

    /// All the pools' ledgers (for the rebind records).
    pub fn ledgers(&mut self) -> &mut Ledgers {
        self.ledgers
    }

    /// The charges per host as if the desktop `uid` did not exist, counting what the ledger
    /// admitted and the cache may not show yet.
    pub fn charges_without(&mut self, uid: &str) -> Counted<'a> {
        self.stores.charges(self.ledgers).without(uid)
    }

    /// Records that this transaction reserved a port for the desktop.
    pub fn reserved_port(&mut self) {
        self.reserved = true;
    }

    /// Ends the transaction: what a failed commit must give back.
    pub fn finish(self) -> Undo {
        Undo {
            pool: self.pool_name,
            release_port: self.reserved,
        }
    }
}

/// What a failed commit gives back of its transaction, in one step.
#[derive(Debug, Default)]
pub(super) struct Undo {
    pool: String,
    release_port: bool,
}

impl Undo {
    /// Gives back the port the transaction reserved for the desktop `uid`, if it did.
    pub async fn rollback(self, ctx: &Context, uid: &str) {
        if !self.release_port {
            return;
        }
        if let Some(l) = ctx.ledgers.lock().await.get_mut(&self.pool)
            && let Some((host, port)) = l.release_port(uid)
        {
            tracing::debug!(%host, port, "a port reserved by a pass that failed goes back");
        }
    }
}
