//! What a desktop asks of a host, read from its spec: vCPUs, memory bytes, and whether its vCPUs
//! are pinned to dedicated threads and its memory backed by hugepages.

use crate::quantity::{QuantityError, parse_bytes};

/// Why a desktop's spec cannot be turned into a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// `spec.memory` is not a quantity.
    #[error("spec.memory: {0}")]
    Memory(QuantityError),
}

/// The resources one desktop holds on its host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Request {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory in bytes.
    pub memory: u64,
    /// Each vCPU pinned to its own physical thread, outside overcommit.
    pub dedicated_cpus: bool,
    /// Guest memory backed by the host's hugepages.
    pub hugepages: bool,
}

impl Request {
    /// A plain request for `vcpus` and `memory` bytes.
    pub const fn new(vcpus: u32, memory: u64) -> Self {
        Self {
            vcpus,
            memory,
            dedicated_cpus: false,
            hugepages: false,
        }
    }

    /// The same request with its vCPUs pinned to dedicated threads.
    pub const fn dedicated(mut self) -> Self {
        self.dedicated_cpus = true;
        self
    }

    /// The same request backed by hugepages.
    pub const fn with_hugepages(mut self) -> Self {
        self.hugepages = true;
        self
    }

    /// Reads a request of `vcpus` and a `memory` quantity (`spec.memory`).
    pub fn read(vcpus: u32, memory: &str) -> Result<Self, RequestError> {
        Ok(Self::new(
            vcpus,
            parse_bytes(memory).map_err(RequestError::Memory)?,
        ))
    }

    /// The size a desktop's host gives its domain and the operator charges it for: the vCPUs
    /// and memory the operator admitted (`status.allocation`, when recorded), else this
    /// request's; dedicated CPUs and hugepages are always this request's.
    pub fn admitted_as(self, allocation: Option<(u32, &str)>) -> Result<Self, RequestError> {
        let Some((vcpus, memory)) = allocation else {
            return Ok(self);
        };
        Ok(Self {
            dedicated_cpus: self.dedicated_cpus,
            hugepages: self.hugepages,
            ..Self::read(vcpus, memory)?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_quantities_and_refuses_bad_ones() -> Result<(), RequestError> {
        assert_eq!(Request::read(2, "2Gi")?, Request::new(2, 2 << 30));
        assert_eq!(
            Request::read(8, "16Gi")?.dedicated().with_hugepages(),
            Request::new(8, 16 << 30).dedicated().with_hugepages()
        );
        assert!(matches!(
            Request::read(2, "4GB"),
            Err(RequestError::Memory(_))
        ));
        Ok(())
    }
}
