//! The libvirt implementation of [`Hypervisor`], and the only module tree of the workspace
//! that imports `virt`. Every call runs in `tokio::task::spawn_blocking`; the blocking
//! operations live in [`domains`], [`networks`] and [`host`]; libvirt errors are mapped in
//! [`errors`]; the connection is kept (and re-opened with backoff) by [`connection`].
//! `virt::sys` is used for flag constants only, never for raw calls.

mod connection;
mod domains;
mod errors;
mod host;
mod networks;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use virt::connect::Connect;

use self::connection::Connection;
use super::{
    Activity, Backoff, Change, DomainStatus, DomainSummary, HostFacts, Hypervisor, HypervisorError,
    Result,
};
use crate::domain::{DhcpHost, DomainType};

/// A [`Hypervisor`] backed by libvirt at one URI (`qemu:///system`, or `test:///default` in
/// tests). Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct LibvirtHypervisor {
    connection: Arc<Connection>,
}

impl std::fmt::Debug for LibvirtHypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtHypervisor")
            .field("uri", &self.connection.uri())
            .field("connected", &self.connection.is_connected())
            .finish()
    }
}

impl LibvirtHypervisor {
    /// A handle for `uri` that connects on first use (so the agent can start while libvirt is
    /// down and report `LibvirtConnected=False`).
    pub fn new(uri: &str) -> Self {
        Self::with_backoff(uri, Backoff::default())
    }

    /// Like [`Self::new`] with a chosen reconnect backoff.
    pub fn with_backoff(uri: &str, backoff: Backoff) -> Self {
        Self {
            connection: Arc::new(Connection::new(uri, backoff)),
        }
    }

    /// A handle for `uri`, connected now.
    pub async fn connect(uri: &str) -> Result<Self> {
        let hypervisor = Self::new(uri);
        hypervisor.run("connect", |_| Ok(())).await?;
        Ok(hypervisor)
    }

    /// The libvirt URI.
    pub fn uri(&self) -> &str {
        self.connection.uri()
    }

    /// Runs `f` on the connection in a blocking thread; a disconnect drops the connection so
    /// the next call reopens it.
    async fn run<T, F>(&self, op: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> Result<T> + Send + 'static,
    {
        let connection = Arc::clone(&self.connection);
        let task = tokio::task::spawn_blocking(move || {
            let conn = connection.get(op)?;
            let result = match conn.get() {
                Some(c) => f(c),
                None => Err(HypervisorError::Disconnected {
                    op,
                    message: "connection is closing".into(),
                }),
            };
            if matches!(result, Err(HypervisorError::Disconnected { .. })) {
                connection.invalidate(&conn);
            }
            result
        });
        match task.await {
            Ok(result) => result,
            Err(join) => Err(HypervisorError::Task {
                op,
                message: join.to_string(),
            }),
        }
    }
}

impl Hypervisor for LibvirtHypervisor {
    fn is_connected(&self) -> bool {
        self.connection.is_connected()
    }

    async fn probe(&self) -> bool {
        self.run("probe", host::probe).await.is_ok() && self.is_connected()
    }

    async fn host_facts(&self, domain_type: DomainType) -> Result<HostFacts> {
        self.run("read host facts", move |c| host::facts(c, domain_type))
            .await
    }

    async fn list_domains(&self) -> Result<Vec<DomainSummary>> {
        self.run("list domains", domains::list).await
    }

    async fn domain_by_uuid(&self, uuid: &str) -> Result<Option<DomainSummary>> {
        let uuid = uuid.to_string();
        self.run("look up domain", move |c| domains::by_uuid(c, &uuid))
            .await
    }

    async fn domain_by_name(&self, name: &str) -> Result<Option<DomainSummary>> {
        let name = name.to_string();
        self.run("look up domain", move |c| domains::by_name(c, &name))
            .await
    }

    async fn define_domain(&self, xml: &str) -> Result<String> {
        let xml = xml.to_string();
        self.run("define domain", move |c| domains::define(c, &xml))
            .await
    }

    async fn start_domain(&self, name: &str) -> Result<Change> {
        let name = name.to_string();
        self.run("start domain", move |c| domains::start(c, &name))
            .await
    }

    async fn shutdown_domain(&self, name: &str) -> Result<Change> {
        let name = name.to_string();
        self.run("shut down domain", move |c| domains::shutdown(c, &name))
            .await
    }

    async fn destroy_domain(&self, name: &str) -> Result<Change> {
        let name = name.to_string();
        self.run("destroy domain", move |c| domains::destroy(c, &name))
            .await
    }

    async fn undefine_domain(&self, name: &str) -> Result<Change> {
        let name = name.to_string();
        self.run("undefine domain", move |c| domains::undefine(c, &name))
            .await
    }

    async fn managed_save(&self, name: &str) -> Result<Change> {
        let name = name.to_string();
        self.run("managed save", move |c| domains::managed_save(c, &name))
            .await
    }

    async fn sync_managed_save(&self, name: &str, image: &Path) -> Result<Change> {
        let name = name.to_string();
        let image = image.to_string_lossy().into_owned();
        self.run("update saved memory image", move |c| {
            domains::sync_managed_save(c, &name, &image)
        })
        .await
    }

    async fn remove_managed_save(&self, name: &str) -> Result<Change> {
        let name = name.to_string();
        self.run("remove saved memory image", move |c| {
            domains::remove_managed_save(c, &name)
        })
        .await
    }

    async fn domain_status(&self, name: &str) -> Result<DomainStatus> {
        let name = name.to_string();
        self.run("read domain status", move |c| domains::status(c, &name))
            .await
    }

    async fn domain_xml(&self, name: &str, inactive: bool) -> Result<String> {
        let name = name.to_string();
        self.run("read domain xml", move |c| domains::xml(c, &name, inactive))
            .await
    }

    async fn qemu_pid(&self, name: &str) -> Result<Option<u32>> {
        let name = name.to_string();
        self.run("read qemu pid", move |c| domains::qemu_pid(c, &name))
            .await
    }

    async fn ensure_network(&self, xml: &str) -> Result<String> {
        let xml = xml.to_string();
        self.run("ensure network", move |c| networks::ensure(c, &xml))
            .await
    }

    async fn sync_dhcp_hosts(&self, network: &str, hosts: &[DhcpHost]) -> Result<Change> {
        let network = network.to_string();
        let desired: BTreeSet<DhcpHost> = hosts
            .iter()
            .map(|h| DhcpHost {
                mac: h.mac.to_ascii_lowercase(),
                ip: h.ip,
            })
            .collect();
        self.run("update dhcp hosts", move |c| {
            networks::sync_dhcp_hosts(c, &network, &desired)
        })
        .await
    }

    async fn remove_network(&self, name: &str) -> Result<Change> {
        let name = name.to_string();
        self.run("remove network", move |c| networks::remove(c, &name))
            .await
    }

    async fn domain_disk_paths(&self) -> Result<BTreeSet<String>> {
        self.run("list disk paths", domains::disk_paths).await
    }

    async fn update_live_device(&self, name: &str, device_xml: &str) -> Result<Change> {
        let name = name.to_string();
        let xml = device_xml.to_string();
        self.run("update live device", move |c| {
            domains::update_live_device(c, &name, &xml)
        })
        .await
    }

    async fn activity(&self, name: &str) -> Result<Activity> {
        let name = name.to_string();
        self.run("read activity", move |c| domains::activity(c, &name))
            .await
    }

    async fn dhcp_hosts(&self, network: &str) -> Result<Vec<DhcpHost>> {
        let network = network.to_string();
        self.run("read dhcp hosts", move |c| {
            networks::dhcp_hosts(c, &network)
        })
        .await
    }
}
