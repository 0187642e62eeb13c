//! The first level of placement: which pool a desktop names, and that pool's policy. A plain
//! index of pool name → policy (or why the pool's spec is unusable), updated from the watch.

use std::collections::BTreeMap;

use super::policy::{PolicyError, PoolPolicy};

/// Pools by name, each with its policy or the reason its spec cannot be used.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolIndex {
    pools: BTreeMap<String, Result<PoolPolicy, PolicyError>>,
}

impl PoolIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records (or replaces) pool `name` with its policy as read, or why it could not be.
    pub fn apply(&mut self, name: &str, policy: Result<PoolPolicy, PolicyError>) {
        self.pools.insert(name.to_owned(), policy);
    }

    /// Records (or replaces) pool `name` with an already-read policy.
    pub fn insert(&mut self, name: &str, policy: PoolPolicy) {
        self.pools.insert(name.to_owned(), Ok(policy));
    }

    /// Forgets pool `name`.
    pub fn delete(&mut self, name: &str) {
        self.pools.remove(name);
    }

    /// Pool `name`: `None` when unknown, else its policy or why it is unusable.
    pub fn get(&self, name: &str) -> Option<&Result<PoolPolicy, PolicyError>> {
        self.pools.get(name)
    }

    /// Names of the known pools, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.pools.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::policy::PolicySpec;

    #[test]
    fn apply_get_delete() {
        let mut spec = PolicySpec::DEFAULT;
        let mut index = PoolIndex::new();
        index.apply("a", PoolPolicy::read(&spec));
        spec.cpu_ratio = -1.0;
        index.apply("b", PoolPolicy::read(&spec));
        assert!(matches!(index.get("a"), Some(Ok(_))));
        assert!(matches!(
            index.get("b"),
            Some(Err(PolicyError::Overcommit { .. }))
        ));
        assert_eq!(index.names().collect::<Vec<_>>(), ["a", "b"]);
        index.delete("a");
        assert!(index.get("a").is_none());
    }
}
