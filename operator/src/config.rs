//! The operator's command line: every flag has an environment fallback so the chart can set
//! them from the Deployment.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use deskvirt_crds::constants::{
    CONSOLE_NAMESPACE_DEFAULT, IMAGES_NAMESPACE_DEFAULT, LEASE_NAMESPACE_DEFAULT,
};
use deskvirt_crds::quantity::parse_duration;
use deskvirt_runtime::api::ApiTimeouts;
use deskvirt_runtime::logging::LogFormat;

/// Schedules Desktops onto KVM hosts, allocates SPICE ports, MACs and subnets, tracks host health.
#[derive(Debug, Clone, Parser)]
#[command(name = "deskvirt-operator", version, about)]
pub struct Config {
    /// Address of the /healthz, /readyz and /metrics endpoint.
    #[arg(long, env = "DESKVIRT_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// deskvirt's system namespace: the leader-election Lease and the hosts' heartbeat Leases.
    #[arg(long, env = "POD_NAMESPACE", default_value = LEASE_NAMESPACE_DEFAULT)]
    pub namespace: String,

    /// Namespace of the console password mirrors (`console-<desktop uid>`), which the
    /// node-agents read; keep nothing else there (see `CONSOLE_MIRROR_PREFIX`).
    #[arg(long, env = "DESKVIRT_CONSOLE_NAMESPACE", default_value = CONSOLE_NAMESPACE_DEFAULT)]
    pub console_namespace: String,

    /// The images namespace: only DesktopImages there may import from a URL (a URL a tenant
    /// controls could reach inside the cluster), and Desktops of every namespace may use them.
    /// Only administrators should hold rights there.
    #[arg(long, env = "DESKVIRT_IMAGES_NAMESPACE", default_value = IMAGES_NAMESPACE_DEFAULT)]
    pub images_namespace: String,

    /// Namespaces whose Desktops get their `<desktop>-console` Secret, comma-separated. The
    /// operator holds Secret rights only there (one Role each, chart value
    /// `consoles.userNamespaces`); a Desktop elsewhere gets `ConsoleSecret=False
    /// NamespaceNotAllowed` and no Secret. Empty: no namespace gets one.
    #[arg(
        long,
        env = "DESKVIRT_CONSOLE_USER_NAMESPACES",
        value_delimiter = ',',
        default_value = ""
    )]
    pub console_user_namespaces: Vec<String>,

    /// Log format: text or json.
    #[arg(long, env = "DESKVIRT_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// How long a host heartbeat Lease stays valid without renewal when the Lease itself does
    /// not say (leaseDurationSeconds); past it the host is lost. Such as 40s.
    #[arg(
        long,
        alias = "lease-duration",
        env = "DESKVIRT_HOST_TIMEOUT",
        default_value = "40s",
        value_parser = parse_flag_duration
    )]
    pub host_timeout: Duration,

    /// How long the operator's leader Lease is valid without renewal.
    #[arg(
        long,
        env = "DESKVIRT_LEADER_LEASE_DURATION",
        default_value = "15s",
        value_parser = parse_flag_duration
    )]
    pub leader_lease_duration: Duration,

    /// Allowance for clock skew between replicas: this replica stops writing this long before
    /// its leader Lease could expire (at most a quarter of the Lease).
    #[arg(
        long,
        env = "DESKVIRT_LEADER_CLOCK_SKEW",
        default_value = "1s",
        value_parser = parse_duration_or_zero
    )]
    pub leader_clock_skew: Duration,

    /// Test only: wait this long between deciding a binding and writing it (to catch a
    /// leader mid-bind).
    #[arg(long, env = "DESKVIRT_TEST_BIND_DELAY", hide = true, value_parser = parse_flag_duration)]
    pub test_bind_delay: Option<Duration>,

    /// Identity in the leader Lease and in Events; the pod name, else the host name.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// How often the leader deletes console password mirrors whose Desktop is gone (besides
    /// once on becoming leader).
    #[arg(
        long,
        env = "DESKVIRT_MIRROR_SWEEP_INTERVAL",
        default_value = "10m",
        value_parser = parse_flag_duration
    )]
    pub mirror_sweep_interval: Duration,

    /// Shortest time between two writes of one ResourcePool's status. A pool's status changes
    /// with every desktop of the pool; during a burst it is written at most this often, and
    /// once more when the burst ends. `0s` writes every change at once.
    #[arg(
        long,
        env = "DESKVIRT_POOL_STATUS_INTERVAL",
        default_value = "2s",
        value_parser = parse_duration_or_zero
    )]
    pub pool_status_interval: Duration,

    /// Migrations that may hold a target at once in one pool; more wait (Pending, reason
    /// Queued), oldest first.
    #[arg(long, env = "DESKVIRT_MIGRATIONS_PER_POOL", default_value = "4",
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub migrations_per_pool: u32,

    /// Migrations that may hold a target at once per host, counting those leaving it and those
    /// coming to it: a host's link and memory bandwidth are shared by every copy.
    #[arg(long, env = "DESKVIRT_MIGRATIONS_PER_HOST", default_value = "2",
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub migrations_per_host: u32,

    /// How long a migration may wait for its desktop to be movable or for a target (Pending)
    /// before it fails with the reason it waited for.
    #[arg(
        long,
        env = "DESKVIRT_MIGRATION_PENDING_TIMEOUT",
        default_value = "5m",
        value_parser = parse_flag_duration
    )]
    pub migration_pending_timeout: Duration,

    /// How long a reserved target waits for the source host to start moving the desktop
    /// before the migration fails (StartTimeout) and the target is freed.
    #[arg(
        long,
        env = "DESKVIRT_MIGRATION_START_TIMEOUT",
        default_value = "60s",
        value_parser = parse_flag_duration
    )]
    pub migration_start_timeout: Duration,

    /// Only manage ResourcePools, DomainNodes and Desktops matching this label selector
    /// (sharding, and isolation of concurrent test runs). Empty manages everything.
    #[arg(long, env = "DESKVIRT_LABEL_SELECTOR", default_value = "")]
    pub label_selector: String,

    /// Deadlines of API calls.
    #[command(flatten)]
    pub api: ApiTimeouts,
}

fn parse_flag_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

impl Config {
    /// The namespaces whose Desktops get a console Secret, without blanks.
    pub fn console_user_namespaces(&self) -> std::collections::BTreeSet<String> {
        self.console_user_namespaces
            .iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect()
    }

    /// The identity to use: `--identity`, else the host name, else a fixed fallback.
    pub fn identity(&self) -> String {
        if let Some(id) = self.identity.as_ref().filter(|s| !s.is_empty()) {
            return id.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "deskvirt-operator".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_durations() {
        let c = Config::try_parse_from(["deskvirt-operator", "--host-timeout", "3s"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.host_timeout, Duration::from_secs(3));
        assert_eq!(c.leader_lease_duration, Duration::from_secs(15));
        assert_eq!(c.metrics_addr.port(), 8080);
        assert_eq!(c.mirror_sweep_interval, Duration::from_secs(600));
        assert_eq!(c.pool_status_interval, Duration::from_secs(2));
        let c = Config::try_parse_from(["x", "--pool-status-interval", "0s"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.pool_status_interval, Duration::ZERO);
        assert!(Config::try_parse_from(["x", "--host-timeout", "0s"]).is_err());
        let c = Config::try_parse_from(["x", "--lease-duration", "1m"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.host_timeout, Duration::from_secs(60));
        assert!(c.console_user_namespaces().is_empty());
        let c = Config::try_parse_from(["x", "--console-user-namespaces", "team-a, team-b,,"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            c.console_user_namespaces().into_iter().collect::<Vec<_>>(),
            ["team-a", "team-b"]
        );
    }
}
