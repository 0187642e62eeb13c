//! Decides what the agent reports about its host (CPU, memory, versions, max vCPUs, CPU models)
//! and how a connection is checked for life (blocking calls on a libvirt connection).

use virt::connect::Connect;

use super::errors::map;
use crate::domain::DomainType;
use crate::domain::inputs::domain_type_str;
use crate::hypervisor::{HostFacts, HypervisorError, ObjectKind, Result, format_version};

/// Host facts, with `max_vcpus` for domains of `domain_type`.
pub(super) fn facts(conn: &Connect, domain_type: DomainType) -> Result<HostFacts> {
    let err = |e: virt::error::Error| map("read host facts", ObjectKind::Domain, "-", &e);
    let info = conn.node_info().map_err(err)?;
    Ok(HostFacts {
        hostname: conn.hostname().map_err(err)?,
        cpu_model: info.model,
        numa_nodes: info.nodes,
        sockets: info.sockets.saturating_mul(info.nodes.max(1)),
        cores_per_socket: info.cores,
        threads_per_core: info.threads,
        cpus: info.cpus,
        mhz: info.mhz,
        memory_bytes: info.memory.saturating_mul(1024),
        max_vcpus: conn
            .max_vcpus(Some(domain_type_str(domain_type)))
            .map_err(err)?,
        driver: conn.driver_type().map_err(err)?,
        hypervisor_version: format_version(u64::from(conn.hyp_version().map_err(err)?)),
        libvirt_version: format_version(u64::from(conn.lib_version().map_err(err)?)),
        cpu_models: cpu_models(conn, domain_type),
    })
}

/// The named CPU models domains of `domain_type` may be given here; `None` (logged) when the
/// daemon cannot say, so the operator trusts the host rather than shunning it.
fn cpu_models(conn: &Connect, domain_type: DomainType) -> Option<Vec<String>> {
    let virttype = domain_type_str(domain_type);
    let xml = conn
        .domain_capabilities(None, None, None, Some(virttype), 0)
        .map_err(|e| tracing::warn!(error = %e, "cannot read the domain capabilities"))
        .ok()?;
    super::cpu_models::usable(&xml)
        .map_err(
            |e| tracing::warn!(error = %e, "cannot read the CPU models of the domain capabilities"),
        )
        .ok()
}

/// `Ok` while the connection is alive and the daemon answers a request (`is_alive` alone is
/// a local check of the socket: a stopped daemon passes it); `Disconnected` otherwise.
pub(super) fn probe(conn: &Connect) -> Result<()> {
    match conn.is_alive() {
        Ok(true) => conn
            .lib_version()
            .map(drop)
            .map_err(|e| map("probe", ObjectKind::Domain, "-", &e)),
        Ok(false) => Err(HypervisorError::Disconnected {
            op: "probe",
            message: "connection is not alive".into(),
        }),
        Err(e) => Err(map("probe", ObjectKind::Domain, "-", &e)),
    }
}
