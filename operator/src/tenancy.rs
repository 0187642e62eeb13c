//! Who may place what, decided on values: whether a namespace may use a pool (the pool's
//! `namespaceSelector` against the namespace's labels), and whether one more Desktop keeps its
//! namespace within the `deskvirt.io/cpu` and `deskvirt.io/memory` limits of its
//! ResourceQuotas, and whether its backups leave room under `deskvirt.io/backup-storage`.
//! Pure; the Desktop and DesktopBackup controllers feed it from their caches.

use std::collections::BTreeMap;

use deskvirt_crds::constants::quota::{BACKUP_STORAGE, CPU, MEMORY};
use deskvirt_crds::quantity::{format_bytes_approx, parse_bytes};
use deskvirt_crds::resource_pool::ResourcePoolSpec;
use deskvirt_crds::validation::selector_matches;

/// Why a Desktop may not be placed, before any host is looked at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(
        "namespace {namespace} may not use pool {pool}: the pool's spec.namespaceSelector does not select it"
    )]
    NotAllowed { pool: String, namespace: String },
    #[error("pool {pool} has an invalid spec.namespaceSelector: {message}")]
    BadSelector { pool: String, message: String },
    #[error(
        "ResourceQuota {} of namespace {} allows {} {}; its bound desktops hold {} and this one asks for {}",
        .0.quota, .0.namespace, .0.key, .0.limit, .0.used, .0.asked
    )]
    Quota(Box<Excess>),
    #[error(
        "ResourceQuota {quota} of namespace {namespace} allows {BACKUP_STORAGE} {limit}; its backups hold {used}"
    )]
    BackupStorage {
        quota: String,
        namespace: String,
        limit: String,
        used: String,
    },
    #[error("ResourceQuota {quota}: {key} {value:?} is not a quantity deskvirt can read")]
    UnreadableQuota {
        quota: String,
        key: &'static str,
        value: String,
    },
}

/// A quota limit one more desktop would pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Excess {
    pub quota: String,
    pub namespace: String,
    pub key: &'static str,
    pub limit: String,
    pub used: String,
    pub asked: String,
}

/// A deskvirt key of a quota: its name, how its value is read, what is held and asked.
type Check = (&'static str, fn(&str) -> Option<u64>, u64, u64);

/// Whether `namespace` (with `labels`) may place desktops in the pool `pool`.
pub fn pool_allows(
    pool: &str,
    spec: &ResourcePoolSpec,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(), Refused> {
    let Some(selector) = &spec.namespace_selector else {
        return Ok(());
    };
    match selector_matches(selector, labels) {
        Ok(true) => Ok(()),
        Ok(false) => Err(Refused::NotAllowed {
            pool: pool.into(),
            namespace: namespace.into(),
        }),
        Err(e) => Err(Refused::BadSelector {
            pool: pool.into(),
            message: e.to_string(),
        }),
    }
}

/// vCPUs and bytes of memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amount {
    pub cpu: u64,
    pub memory: u64,
}

impl std::ops::Add for Amount {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self {
            cpu: self.cpu.saturating_add(o.cpu),
            memory: self.memory.saturating_add(o.memory),
        }
    }
}

/// A vCPU count as a quota writes it: whole (`4`) or in thousandths (`4000m`), rounded down.
fn parse_cpu(q: &str) -> Option<u64> {
    match q.strip_suffix('m') {
        Some(milli) => milli.parse::<u64>().ok().map(|m| m / 1000),
        None => parse_bytes(q).ok(),
    }
}

/// Checks `asked` on top of `used` against every quota's deskvirt keys; `quotas` holds each
/// quota's name and its `spec.hard`.
pub fn within_quotas<'a>(
    namespace: &str,
    quotas: impl IntoIterator<Item = (&'a str, &'a BTreeMap<String, String>)>,
    used: Amount,
    asked: Amount,
) -> Result<(), Refused> {
    for (name, hard) in quotas {
        let checks: [Check; 2] = [
            (CPU, parse_cpu, used.cpu, asked.cpu),
            (MEMORY, |q| parse_bytes(q).ok(), used.memory, asked.memory),
        ];
        for (key, parse, used, asked) in checks {
            let Some(value) = hard.get(key) else { continue };
            let Some(limit) = parse(value) else {
                return Err(Refused::UnreadableQuota {
                    quota: name.into(),
                    key,
                    value: value.clone(),
                });
            };
            if used.saturating_add(asked) > limit {
                let show = |n: u64| {
                    if key == CPU {
                        n.to_string()
                    } else {
                        format_bytes_approx(n)
                    }
                };
                return Err(Refused::Quota(Box::new(Excess {
                    quota: name.into(),
                    namespace: namespace.into(),
                    key,
                    limit: show(limit),
                    used: show(used),
                    asked: show(asked),
                })));
            }
        }
    }
    Ok(())
}

/// Whether one more backup may be written in `namespace`, whose backups' files hold `used`
/// bytes: not once a quota's `deskvirt.io/backup-storage` is reached.
pub fn backup_room<'a>(
    namespace: &str,
    quotas: impl IntoIterator<Item = (&'a str, &'a BTreeMap<String, String>)>,
    used: u64,
) -> Result<(), Refused> {
    for (name, hard) in quotas {
        let Some(value) = hard.get(BACKUP_STORAGE) else {
            continue;
        };
        let Ok(limit) = parse_bytes(value) else {
            return Err(Refused::UnreadableQuota {
                quota: name.into(),
                key: BACKUP_STORAGE,
                value: value.clone(),
            });
        };
        if used >= limit {
            return Err(Refused::BackupStorage {
                quota: name.into(),
                namespace: namespace.into(),
                limit: format_bytes_approx(limit),
                used: format_bytes_approx(used),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hard(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const GI: u64 = 1 << 30;

    #[test]
    fn a_desktop_within_every_quota_passes() {
        let q = hard(&[
            (CPU, "4"),
            (MEMORY, "8Gi"),
            ("count/desktops.deskvirt.io", "3"),
        ]);
        let used = Amount {
            cpu: 2,
            memory: 4 * GI,
        };
        let asked = Amount {
            cpu: 2,
            memory: 4 * GI,
        };
        assert_eq!(within_quotas("t", [("q", &q)], used, asked), Ok(()));
    }

    #[test]
    fn the_exceeded_key_is_named() {
        let q = hard(&[(CPU, "4000m"), (MEMORY, "8Gi")]);
        let used = Amount { cpu: 3, memory: GI };
        let asked = Amount { cpu: 2, memory: GI };
        let err = within_quotas("t", [("q", &q)], used, asked);
        assert!(
            matches!(&err, Err(Refused::Quota(e)) if e.key == CPU),
            "{err:?}"
        );
        let q = hard(&[(MEMORY, "2Gi")]);
        let err = within_quotas(
            "t",
            [("q", &q)],
            used,
            Amount {
                cpu: 1,
                memory: 2 * GI,
            },
        );
        let msg = err.map_err(|e| e.to_string()).err().unwrap_or_default();
        assert!(msg.contains("deskvirt.io/memory 2Gi"), "{msg}");
    }

    #[test]
    fn backups_wait_once_their_files_fill_the_quota() {
        let q = hard(&[(BACKUP_STORAGE, "10Mi")]);
        assert_eq!(backup_room("ns", [("q", &q)], 9 << 20), Ok(()));
        let e = backup_room("ns", [("q", &q)], 10 << 20)
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|m| m.contains("deskvirt.io/backup-storage") && m.contains("q")),
            "{e:?}"
        );
        let cpu_only = hard(&[(CPU, "4")]);
        assert_eq!(backup_room("ns", [("c", &cpu_only)], u64::MAX), Ok(()));
        let bad = hard(&[(BACKUP_STORAGE, "lots")]);
        assert!(backup_room("ns", [("b", &bad)], 0).is_err());
    }

    #[test]
    fn an_unreadable_quota_refuses() {
        let q = hard(&[(MEMORY, "lots")]);
        let err = within_quotas("t", [("q", &q)], Amount::default(), Amount::default());
        assert!(matches!(err, Err(Refused::UnreadableQuota { .. })));
    }

    #[test]
    fn a_pool_without_selector_allows_every_namespace() {
        let spec: ResourcePoolSpec =
            serde_json::from_value(serde_json::json!({})).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pool_allows("p", &spec, "t", &BTreeMap::new()), Ok(()));
        let spec: ResourcePoolSpec = serde_json::from_value(serde_json::json!({
            "namespaceSelector": { "matchLabels": { "tier": "lab" } }
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            pool_allows("p", &spec, "t", &BTreeMap::new()),
            Err(Refused::NotAllowed { .. })
        ));
        assert_eq!(
            pool_allows("p", &spec, "t", &hard(&[("tier", "lab")])),
            Ok(())
        );
    }
}
