//! The libvirt implementation against libvirt's in-process `test:///default` driver (no
//! daemon). All connections of one process share that driver's state, so every test uses its
//! own domain names and UIDs.

mod common;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{binding, desktop, host, minimal_spec};
use deskvirt_crds::resource_pool::PoolNetwork;
use deskvirt_node_agent::domain::{
    DhcpHost, DomainInputs, DomainType, NetworkInputs, domain_xml, network_xml, parse_identity,
};
use deskvirt_node_agent::hypervisor::{
    Backoff, Change, DomainState, Hypervisor, HypervisorError, LibvirtHypervisor, ObjectKind,
};
use proptest::prelude::*;

const URI: &str = "test:///default";

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A fresh UID (a valid UUID) per call, so tests never collide in the shared driver.
fn unique_uid(tag: u32) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{tag:08x}-0000-4000-8000-{n:012x}")
}

fn inputs_for(namespace: &str, name: &str, uid: &str, spec: serde_json::Value) -> DomainInputs {
    let mut host = host();
    host.domain_type = DomainType::Kvm;
    let desk = desktop(namespace, name, uid, spec);
    match DomainInputs::from_desktop(&desk, &common::valid(&desk), &binding(), &host) {
        Ok(inputs) => inputs,
        Err(e) => panic!("fixture desktop does not convert: {e}"),
    }
}

fn render(inputs: &DomainInputs) -> String {
    match domain_xml(inputs) {
        Ok(xml) => xml,
        Err(e) => panic!("cannot render domain XML: {e}"),
    }
}

async fn connect() -> LibvirtHypervisor {
    match LibvirtHypervisor::connect(URI).await {
        Ok(h) => h,
        Err(e) => panic!("cannot open {URI}: {e}"),
    }
}

#[tokio::test]
async fn define_is_idempotent_and_teardown_too() -> TestResult {
    let hv = connect().await;
    let uid = unique_uid(1);
    let inputs = inputs_for("lifecycle", "alice", &uid, minimal_spec());
    let xml = render(&inputs);

    let name = hv.define_domain(&xml).await?;
    assert_eq!(name, inputs.domain_name());
    assert_eq!(
        hv.define_domain(&xml).await?,
        name,
        "a second define updates in place"
    );

    let listed: Vec<_> = hv
        .list_domains()
        .await?
        .into_iter()
        .filter(|d| d.name == name)
        .collect();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].uuid, uid);
    assert_eq!(listed[0].state, DomainState::ShutOff);
    assert!(listed[0].persistent);
    assert_eq!(listed[0].identity.as_ref(), Some(&inputs.identity));

    assert_eq!(hv.start_domain(&name).await?, Change::Done);
    assert_eq!(hv.start_domain(&name).await?, Change::AlreadyDone);
    let status = hv.domain_status(&name).await?;
    assert_eq!(status.state, DomainState::Running);
    assert_eq!(status.max_memory_kib, 2 << 20);
    assert_eq!(
        hv.qemu_pid(&name).await?,
        None,
        "the test driver has no QEMU process"
    );

    assert_eq!(hv.destroy_domain(&name).await?, Change::Done);
    assert_eq!(
        hv.destroy_domain(&name).await?,
        Change::AlreadyDone,
        "not running counts as off"
    );
    assert_eq!(hv.shutdown_domain(&name).await?, Change::AlreadyDone);

    assert_eq!(hv.undefine_domain(&name).await?, Change::Done);
    assert_eq!(
        hv.undefine_domain(&name).await?,
        Change::AlreadyDone,
        "NotFound maps to AlreadyDone"
    );
    assert_eq!(hv.destroy_domain(&name).await?, Change::AlreadyDone);
    assert!(hv.list_domains().await?.iter().all(|d| d.name != name));
    Ok(())
}

#[tokio::test]
async fn missing_domain_is_not_found() -> TestResult {
    let hv = connect().await;
    let missing = "no-such--domain";
    for result in [
        hv.domain_status(missing).await.map(|_| ()),
        hv.domain_xml(missing, false).await.map(|_| ()),
        hv.start_domain(missing).await.map(|_| ()),
        hv.managed_save(missing).await.map(|_| ()),
    ] {
        match result {
            Err(HypervisorError::NotFound {
                kind: ObjectKind::Domain,
                name,
            }) => assert_eq!(name, missing),
            other => panic!("expected NotFound, got {other:?}"),
        }
    }
    assert_eq!(hv.shutdown_domain(missing).await?, Change::AlreadyDone);
    Ok(())
}

#[tokio::test]
async fn redefining_with_the_same_uuid_updates_in_place() -> TestResult {
    let hv = connect().await;
    let uid = unique_uid(2);
    let name = hv
        .define_domain(&render(&inputs_for("update", "bob", &uid, minimal_spec())))
        .await?;
    let mut bigger = minimal_spec();
    bigger["memory"] = serde_json::json!("3Gi");
    bigger["cpu"] = serde_json::json!(3);
    hv.define_domain(&render(&inputs_for("update", "bob", &uid, bigger)))
        .await?;
    let status = hv.domain_status(&name).await?;
    assert_eq!((status.max_memory_kib, status.vcpus), (3 << 20, 3));
    assert_eq!(
        hv.list_domains()
            .await?
            .iter()
            .filter(|d| d.uuid == uid)
            .count(),
        1
    );
    hv.undefine_domain(&name).await?;
    Ok(())
}

#[tokio::test]
async fn every_field_desktop_is_accepted() -> TestResult {
    let hv = connect().await;
    let spec = serde_json::json!({
        "pool": "default",
        "user": "Zoë <zoe@example.com> & \"friends\"",
        "cpu": 2,
        "memory": "1Gi",
        "disk": { "image": "debian-12.qcow2" },
        "boot": { "kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": "console=ttyS0 a=<b>&c" },
        "display": { "usb": { "channels": 4, "allow": [ { "class": "0x03" } ], "deny": [ { "vendor": "0x0781" } ] } },
        "performance": { "dedicatedCpus": true, "hugepages": true }
    });
    let mut host = host();
    host.network = deskvirt_node_agent::domain::NetworkAttachment::Bridge {
        bridge: "br0".into(),
    };
    host.spice_tls = true;
    let mut binding = binding();
    binding.pinned_cpus = vec![0, 1];
    let desk = desktop("full", "carol", &unique_uid(3), spec);
    let inputs = match DomainInputs::from_desktop(&desk, &common::valid(&desk), &binding, &host) {
        Ok(inputs) => inputs,
        Err(e) => panic!("fixture does not convert: {e}"),
    };
    let name = hv.define_domain(&render(&inputs)).await?;
    let live = hv.domain_xml(&name, false).await?;
    assert_eq!(parse_identity(&live), Some(inputs.identity.clone()));
    for element in [
        "<redirdev",
        "<redirfilter",
        "<cputune",
        "<hugepages",
        "<kernel>",
        "<channel",
        "<memballoon",
        "<serial",
    ] {
        assert!(live.contains(element), "libvirt dropped {element}:\n{live}");
    }
    assert!(
        !live.contains("s3cret-pw"),
        "the password is not in non-secure XML"
    );
    assert_eq!(hv.start_domain(&name).await?, Change::Done);
    assert_eq!(hv.managed_save(&name).await?, Change::Done);
    let saved = hv.domain_status(&name).await?;
    assert!(
        saved.has_managed_save && saved.state == DomainState::ShutOff,
        "{saved:?}"
    );
    assert_eq!(hv.managed_save(&name).await?, Change::AlreadyDone);
    assert_eq!(
        hv.undefine_domain(&name).await?,
        Change::Done,
        "undefine removes the save image too"
    );
    Ok(())
}

#[tokio::test]
async fn disks_of_defined_domains_are_listed() -> TestResult {
    let hv = connect().await;
    let inputs = inputs_for("disks", "dave", &unique_uid(4), minimal_spec());
    let name = hv.define_domain(&render(&inputs)).await?;
    assert!(hv.domain_disk_paths().await?.contains(&inputs.disk_path));
    hv.undefine_domain(&name).await?;
    assert!(!hv.domain_disk_paths().await?.contains(&inputs.disk_path));
    Ok(())
}

#[tokio::test]
async fn host_facts_are_reported() -> TestResult {
    let hv = connect().await;
    let facts = hv.host_facts(DomainType::Kvm).await?;
    assert!(
        facts.cpus > 0 && facts.memory_bytes > 0 && facts.max_vcpus > 0,
        "{facts:?}"
    );
    assert!(!facts.hostname.is_empty() && !facts.libvirt_version.is_empty());
    assert!(hv.is_connected() && hv.probe().await);
    Ok(())
}

#[tokio::test]
async fn network_is_ensured_and_leases_synced() -> TestResult {
    let hv = connect().await;
    let lease = |last: u8, ip: u8| DhcpHost {
        mac: format!("52:54:00:00:00:{last:02x}"),
        ip: Ipv4Addr::new(10, 9, 0, ip),
    };
    let inputs = match NetworkInputs::for_pool(
        "nettest",
        &PoolNetwork::default(),
        "10.9.0.0/24",
        vec![lease(1, 10)],
    ) {
        Ok(Some(inputs)) => inputs,
        other => panic!("expected a network: {other:?}"),
    };
    let xml = network_xml(&inputs)?;
    let name = hv.ensure_network(&xml).await?;
    assert_eq!(name, inputs.name);
    assert_eq!(
        hv.ensure_network(&xml).await?,
        name,
        "a second define updates in place"
    );

    assert_eq!(
        hv.sync_dhcp_hosts(&name, &[lease(1, 10)]).await?,
        Change::AlreadyDone
    );
    assert_eq!(
        hv.sync_dhcp_hosts(&name, &[lease(1, 11), lease(2, 12)])
            .await?,
        Change::Done
    );
    assert_eq!(
        hv.sync_dhcp_hosts(&name, &[lease(2, 12), lease(1, 11)])
            .await?,
        Change::AlreadyDone
    );
    assert_eq!(hv.sync_dhcp_hosts(&name, &[]).await?, Change::Done);

    assert_eq!(hv.remove_network(&name).await?, Change::Done);
    assert_eq!(hv.remove_network(&name).await?, Change::AlreadyDone);
    match hv.sync_dhcp_hosts(&name, &[]).await {
        Err(HypervisorError::NotFound {
            kind: ObjectKind::Network,
            ..
        }) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn unreachable_libvirt_is_disconnected_with_backoff() {
    let backoff = Backoff {
        initial: Duration::from_secs(60),
        max: Duration::from_secs(60),
    };
    let hv = LibvirtHypervisor::with_backoff(
        "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
        backoff,
    );
    assert!(!hv.is_connected());
    assert!(matches!(
        hv.list_domains().await,
        Err(HypervisorError::Disconnected { .. })
    ));
    match hv.list_domains().await {
        Err(HypervisorError::Disconnected { message, .. }) => {
            assert!(
                message.contains("next reconnect attempt"),
                "the backoff holds: {message}"
            )
        }
        other => panic!("expected Disconnected, got {other:?}"),
    }
    assert!(!hv.probe().await && !hv.is_connected());
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => panic!("cannot build a tokio runtime: {e}"),
        }
    })
}

/// Defines, reads back and undefines one domain; the identity libvirt returns.
async fn round_trip(
    hv: &LibvirtHypervisor,
    inputs: &DomainInputs,
) -> Result<
    (
        Option<String>,
        Vec<Option<deskvirt_node_agent::domain::DesktopIdentity>>,
    ),
    HypervisorError,
> {
    let name = hv.define_domain(&render(inputs)).await?;
    let listed = hv.list_domains().await.map(|all| {
        all.into_iter()
            .filter(|d| d.uuid == inputs.identity.uid)
            .map(|d| d.identity)
            .collect::<Vec<_>>()
    });
    let xml = hv.domain_xml(&name, false).await;
    hv.undefine_domain(&name).await?;
    Ok((xml?.into(), listed?))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn identity_survives_libvirt(
        namespace in "\\PC{0,30}|[<>&\"' \\]\u{0}\u{1b}\t\r\na-z-]{0,12}",
        name in "\\PC{0,70}|[<>&\"'\\]]{1,8}",
        user in proptest::option::of("\\PC{0,40}|[<>&\"' \\]%\u{7}\r\n]{0,16}"),
    ) {
        let uid = unique_uid(5);
        let mut spec = minimal_spec();
        spec["user"] = serde_json::json!(user);
        let inputs = inputs_for(&namespace, &name, &uid, spec);
        let (xml, listed) = runtime()
            .block_on(async { round_trip(&connect().await, &inputs).await })
            .map_err(|e| TestCaseError::fail(format!("libvirt refused: {e}")))?;
        prop_assert_eq!(listed, vec![Some(inputs.identity.clone())]);
        prop_assert_eq!(parse_identity(&xml.unwrap_or_default()), Some(inputs.identity.clone()));
    }
}
