//! Decides what a domain is made from: the plain [`DomainInputs`] value, gathered from a
//! Desktop, the operator's binding and this host's context, with every field checked.

use deskvirt_core::scheduler::RequestError;
use deskvirt_crds::Desktop;
use deskvirt_crds::desktop::{DesktopStatus, UsbPolicy};
use deskvirt_crds::resource_pool::ResourcePool;
use deskvirt_crds::validation::ValidDesktop;

use super::boot::KernelBoot;
use super::error::BuildError;
use super::graphics::{SpiceConfig, listen_address};
use super::metadata::DesktopIdentity;
use super::names::{disk_path, domain_name};
use super::network::{NetworkAttachment, normalize_mac};
use super::secret::Secret;

/// `kvm` (hardware virtualization) or `qemu` (TCG), the domain's `type` attribute.
pub use deskvirt_crds::domain_node::Hypervisor as DomainType;

/// The libvirt `<domain type>` string.
pub fn domain_type_str(kind: DomainType) -> &'static str {
    match kind {
        DomainType::Kvm => "kvm",
        DomainType::Qemu => "qemu",
    }
}

/// What the operator decided for a desktop, plus the per-desktop choices of this agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// Host the desktop is bound to (`status.node`).
    pub node: String,
    /// SPICE port on that host (`status.spice.port`).
    pub spice_port: u16,
    /// The desktop's MAC (`status.mac`).
    pub mac: String,
    /// SPICE password, from the desktop's console Secret.
    pub spice_password: Secret,
    /// Host CPUs reserved for the desktop's vCPUs when `performance.dedicatedCpus` is set, one
    /// per vCPU in order; ignored otherwise.
    pub pinned_cpus: Vec<u32>,
}

impl Binding {
    /// Reads the operator's binding from a Desktop's status.
    pub fn from_status(
        status: Option<&DesktopStatus>,
        spice_password: Secret,
    ) -> Result<Self, BuildError> {
        let missing = |field| BuildError::MissingBinding { field };
        let status = status.ok_or(missing("status"))?;
        Ok(Self {
            node: status.node.clone().ok_or(missing("status.node"))?,
            spice_port: status
                .spice
                .as_ref()
                .and_then(|s| s.port)
                .ok_or(missing("status.spice.port"))?,
            mac: status.mac.clone().ok_or(missing("status.mac"))?,
            spice_password,
            pinned_cpus: Vec::new(),
        })
    }
}

/// What this host and its pool contribute to every domain.
#[derive(Debug, Clone, PartialEq)]
pub struct HostContext {
    /// This agent's node (DomainNode name).
    pub node_name: String,
    /// `kvm`, or `qemu` where KVM is unusable.
    pub domain_type: DomainType,
    /// The pool's `storage.imageDir`.
    pub image_dir: String,
    /// The pool's `storage.diskDir`.
    pub disk_dir: String,
    /// Where NICs are plugged in.
    pub network: NetworkAttachment,
    /// SPICE listen address from the pool's policy.
    pub spice_listen: String,
    /// The pool's `display.tls`.
    pub spice_tls: bool,
}

impl HostContext {
    /// The context of host `node_name` (reachable at `node_address`) in `pool`.
    pub fn for_pool(
        node_name: &str,
        node_address: &str,
        domain_type: DomainType,
        pool: &ResourcePool,
    ) -> Result<Self, BuildError> {
        let pool_name = pool
            .metadata
            .name
            .as_deref()
            .ok_or(BuildError::MissingMetadata {
                field: "pool metadata.name",
            })?;
        let spec = &pool.spec;
        Ok(Self {
            node_name: node_name.to_string(),
            domain_type,
            image_dir: spec.storage.image_dir.clone(),
            disk_dir: spec.storage.disk_dir.clone(),
            network: NetworkAttachment::for_pool(pool_name, &spec.network)?,
            spice_listen: listen_address(spec.display.listen, node_address),
            spice_tls: spec.display.tls,
        })
    }
}

/// Everything a domain XML is made from, as plain values.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainInputs {
    /// The Desktop the domain belongs to (its UID becomes the domain `<uuid>`).
    pub identity: DesktopIdentity,
    /// The libvirt domain name: [`domain_name`] of the identity, or the name an adopted domain
    /// of an earlier release already has ([`Self::under_name`]).
    pub domain: String,
    /// `kvm` or `qemu`.
    pub domain_type: DomainType,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// Absolute path of the desktop's qcow2 disk.
    pub disk_path: String,
    /// Direct kernel boot; `None` boots from the disk.
    pub boot: Option<KernelBoot>,
    /// Where the NIC is plugged in.
    pub network: NetworkAttachment,
    /// The NIC's MAC, lower case.
    pub mac: String,
    /// SPICE console.
    pub spice: SpiceConfig,
    /// USB redirection policy in effect.
    pub usb: UsbPolicy,
    /// Host CPU for each vCPU, in order; empty for no pinning.
    pub cpu_pinning: Vec<u32>,
    /// Back memory with hugepages.
    pub hugepages: bool,
    /// The named CPU model the pool pins; `None` for the hypervisor's default.
    pub cpu_model: Option<String>,
}

/// Whether `uid` looks like a UUID (8-4-4-4-12 hex digits).
fn is_uuid(uid: &str) -> bool {
    let groups: Vec<&str> = uid.split('-').collect();
    let lengths = [8, 4, 4, 4, 12];
    groups.len() == lengths.len()
        && groups
            .iter()
            .zip(lengths)
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl DomainInputs {
    /// Gathers the inputs of a Desktop's domain on this host, from the Desktop and its spec read
    /// against its pool ([`deskvirt_crds::validation::read_desktop`]).
    pub fn from_desktop(
        desktop: &Desktop,
        valid: &ValidDesktop,
        binding: &Binding,
        host: &HostContext,
    ) -> Result<Self, BuildError> {
        let meta = &desktop.metadata;
        let missing = |field| BuildError::MissingMetadata { field };
        let namespace = meta
            .namespace
            .clone()
            .ok_or(missing("metadata.namespace"))?;
        let name = meta.name.clone().ok_or(missing("metadata.name"))?;
        let uid = meta.uid.clone().ok_or(missing("metadata.uid"))?;
        if !is_uuid(&uid) {
            return Err(BuildError::BadUid { uid });
        }
        if binding.node != host.node_name {
            return Err(BuildError::BoundElsewhere {
                bound: binding.node.clone(),
                this: host.node_name.clone(),
            });
        }
        let spec = &desktop.spec;
        // The size the operator admitted for this host; a larger spec waits until it fits.
        let size = valid
            .admitted(deskvirt_crds::read::allocation(desktop.status.as_ref()))
            .map_err(|RequestError::Memory(source)| BuildError::BadQuantity {
                field: "status.allocation.memory",
                source,
            })?;
        let (vcpus, memory_bytes) = (size.vcpus, size.memory);
        if vcpus == 0 {
            return Err(BuildError::Zero { field: "spec.cpu" });
        }
        if memory_bytes < 1024 {
            return Err(BuildError::Zero {
                field: "spec.memory",
            });
        }
        if !spec.performance.sriov.is_empty() {
            return Err(BuildError::Unsupported {
                feature: "spec.performance.sriov",
            });
        }
        let mac = normalize_mac(&binding.mac).ok_or_else(|| BuildError::BadMac {
            mac: binding.mac.clone(),
        })?;
        let boot = spec
            .boot
            .as_ref()
            .map(|b| KernelBoot::from_spec(b, &host.image_dir))
            .transpose()?;
        let cpu_pinning = if spec.performance.dedicated_cpus {
            let wanted = vcpus as usize;
            if binding.pinned_cpus.len() < wanted {
                return Err(BuildError::NotEnoughPinnedCpus {
                    wanted: vcpus,
                    got: binding.pinned_cpus.len(),
                });
            }
            binding.pinned_cpus[..wanted].to_vec()
        } else {
            Vec::new()
        };
        let domain = domain_name(&namespace, &name, &uid);
        Ok(Self {
            disk_path: disk_path(&host.disk_dir, &domain),
            domain,
            identity: DesktopIdentity {
                namespace,
                name,
                uid,
                user: spec.user.clone(),
                pool: desktop.pool().to_string(),
            },
            domain_type: host.domain_type,
            vcpus,
            memory_bytes,
            boot,
            network: host.network.clone(),
            mac,
            spice: SpiceConfig {
                port: binding.spice_port,
                listen: host.spice_listen.clone(),
                password: binding.spice_password.clone(),
                tls: host.spice_tls,
            },
            usb: valid.usb.clone(),
            cpu_pinning,
            hugepages: spec.performance.hugepages,
            cpu_model: valid.cpu_model.clone(),
        })
    }

    /// The libvirt domain name.
    pub fn domain_name(&self) -> String {
        self.domain.clone()
    }

    /// The same inputs for a domain that exists under `domain` already (one an earlier release
    /// defined under another naming scheme, found by its `<uuid>` and adopted): it keeps its
    /// name, and the disk named after it.
    pub fn under_name(mut self, domain: &str, host: &HostContext) -> Self {
        self.domain = domain.to_string();
        self.disk_path = disk_path(&host.disk_dir, domain);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_recognized() {
        assert!(is_uuid("0b7e9a4c-1111-4222-8333-444455556666"));
        assert!(!is_uuid("0b7e9a4c-1111-4222-8333-44445555666"));
        assert!(!is_uuid("not-a-uuid"));
    }

    #[test]
    fn binding_needs_node_port_and_mac() {
        let mut status = DesktopStatus::default();
        let err = Binding::from_status(Some(&status), Secret::default());
        assert_eq!(
            err,
            Err(BuildError::MissingBinding {
                field: "status.node"
            })
        );
        status.node = Some("n1".into());
        let err = Binding::from_status(Some(&status), Secret::default());
        assert_eq!(
            err,
            Err(BuildError::MissingBinding {
                field: "status.spice.port"
            })
        );
        assert!(err.is_err_and(|e| e.is_transient()));
    }
}
