//! What a desktop asks of a host, read from its spec: vCPUs, memory bytes, and whether its vCPUs
//! are pinned to dedicated threads and its memory backed by hugepages.

use deskvirt_crds::DesktopSpec;
use deskvirt_crds::quantity::{QuantityError, parse_bytes};

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

    /// Reads the request of a desktop's spec.
    pub fn from_spec(spec: &DesktopSpec) -> Result<Self, RequestError> {
        Ok(Self {
            vcpus: spec.cpu,
            memory: parse_bytes(&spec.memory).map_err(RequestError::Memory)?,
            dedicated_cpus: spec.performance.dedicated_cpus,
            hugepages: spec.performance.hugepages,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> DesktopSpec {
        match serde_json::from_str(json) {
            Ok(spec) => spec,
            Err(e) => panic!("test spec must parse: {e}"),
        }
    }

    #[test]
    fn reads_a_desktop_spec() -> Result<(), RequestError> {
        let r = Request::from_spec(&spec(r#"{"pool": "a", "disk": {"image": "x.qcow2"}}"#))?;
        assert_eq!(r, Request::new(2, 2 << 30), "defaults");
        let r = Request::from_spec(&spec(
            r#"{"pool": "a", "cpu": 8, "memory": "16Gi", "disk": {"image": "x.qcow2"},
                "performance": {"dedicatedCpus": true, "hugepages": true}}"#,
        ))?;
        assert_eq!(r, Request::new(8, 16 << 30).dedicated().with_hugepages());
        Ok(())
    }

    #[test]
    fn a_bad_quantity_is_an_error() {
        let err = Request::from_spec(&spec(
            r#"{"pool": "a", "memory": "4GB", "disk": {"image": "x.qcow2"}}"#,
        ));
        assert!(matches!(err, Err(RequestError::Memory(_))));
    }
}
