//! Decides the agent's part of a Desktop's status: the address, the SPICE host and URI, the
//! session and idleness fields, and the conditions `DomainDefined` and `Running`, with stable
//! transition times and messages (the same failure again reads the same). Pure; the caller
//! applies the result only when it differs from what the object already says.

use deskvirt_crds::conditions::{self, Status, condition};
use deskvirt_crds::constants::condition::{DOMAIN_DEFINED, RUNNING};
use deskvirt_crds::desktop::{DesktopStatus, Size};

use super::activity::ActivityStatus;
use super::reason::Reason;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use serde_json::json;

/// One condition as the agent sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    pub status: Status,
    pub reason: Reason,
    pub message: String,
}

impl Cond {
    pub fn new(status: Status, reason: Reason, message: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            message: without_timestamps(&message.into()),
        }
    }
}

/// What the agent reports about one desktop.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Report {
    /// The desktop's pinned address, when it has one.
    pub ip: Option<String>,
    /// Where SPICE clients connect.
    pub spice_host: Option<String>,
    /// The SPICE port, to build the URI (the operator owns `spice.port` itself).
    pub spice_port: Option<u16>,
    /// `DomainDefined`; `None` leaves the condition as it is.
    pub defined: Option<Cond>,
    /// `Running`; `None` leaves the condition as it is.
    pub running: Option<Cond>,
    /// Session, last activity and idle start; `None` leaves them as they are.
    pub activity: Option<ActivityStatus>,
    /// The size of the running domain; `None` leaves the last one reported (the operator reads
    /// it only while `Running` is True).
    pub running_size: Option<Size>,
}

impl Report {
    /// A report that keeps the address, SPICE host and port `status` has, and changes nothing
    /// else until filled in.
    pub fn keeping(status: &DesktopStatus) -> Self {
        let spice = status.spice.clone().unwrap_or_default();
        Self {
            ip: status.ip.clone(),
            spice_host: spice.host,
            spice_port: spice.port,
            ..Self::default()
        }
    }
}

fn spice_uri(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("spice://[{host}]:{port}")
    } else {
        format!("spice://{host}:{port}")
    }
}

/// The agent's conditions after this report, keeping transition times that did not change.
fn agent_conditions(
    current: &DesktopStatus,
    report: &Report,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let prev = &current.conditions;
    let mut out = Vec::new();
    for (type_, wanted) in [
        (DOMAIN_DEFINED, &report.defined),
        (RUNNING, &report.running),
    ] {
        match wanted {
            Some(c) => out.push(condition(
                prev,
                type_,
                c.status,
                c.reason.as_str(),
                c.message.clone(),
                generation,
                now,
            )),
            None => {
                if let Some(old) = conditions::find(prev, type_) {
                    out.push(old.clone());
                }
            }
        }
    }
    out
}

/// The status body to apply, or `None` when the object already says all of it.
pub fn body(
    current: &DesktopStatus,
    report: &Report,
    generation: Option<i64>,
    now: Timestamp,
) -> Option<serde_json::Value> {
    let conds = agent_conditions(current, report, generation, now);
    let current_conds: Vec<Condition> = current
        .conditions
        .iter()
        .filter(|c| c.type_ == DOMAIN_DEFINED || c.type_ == RUNNING)
        .cloned()
        .collect();
    let spice = current.spice.clone().unwrap_or_default();
    let uri = match (&report.spice_host, report.spice_port) {
        (Some(h), Some(p)) => Some(spice_uri(h, p)),
        _ => None,
    };
    let activity = report.activity.clone().unwrap_or_else(|| ActivityStatus {
        session: current.session.clone(),
        last_activity_time: current.last_activity_time.clone(),
        idle_since: current.idle_since.clone(),
    });
    let running_size = report
        .running_size
        .clone()
        .or_else(|| current.running_size.clone());
    let same = current.ip == report.ip
        && current.running_size == running_size
        && spice.host == report.spice_host
        && spice.uri == uri
        && current.session == activity.session
        && current.last_activity_time == activity.last_activity_time
        && current.idle_since == activity.idle_since
        && !conditions::differ_ignoring_time(&current_conds, &conds);
    if same {
        return None;
    }
    let mut status = serde_json::Map::new();
    if let Some(ip) = &report.ip {
        status.insert("ip".into(), json!(ip));
    }
    let mut spice = serde_json::Map::new();
    if let Some(h) = &report.spice_host {
        spice.insert("host".into(), json!(h));
    }
    if let Some(u) = uri {
        spice.insert("uri".into(), json!(u));
    }
    if !spice.is_empty() {
        status.insert("spice".into(), spice.into());
    }
    if let Some(session) = &activity.session {
        status.insert("session".into(), json!(session));
    }
    if let Some(t) = &activity.last_activity_time {
        status.insert("lastActivityTime".into(), json!(t));
    }
    if let Some(t) = &activity.idle_since {
        status.insert("idleSince".into(), json!(t));
    }
    if let Some(size) = &running_size {
        status.insert("runningSize".into(), json!(size));
    }
    status.insert("conditions".into(), json!(conds));
    Some(status.into())
}

/// `message` without the timestamps QEMU and libvirt put in their errors
/// (`2026-12-03T20:01:02.123456Z qemu-system-x86_64: ...`): the same failure again must give
/// the same status, else each retry's status write wakes the desktop at once and the retries
/// never wait their backoff.
pub fn without_timestamps(message: &str) -> String {
    let b = message.as_bytes();
    let mut out = String::with_capacity(message.len());
    let mut i = 0;
    let mut kept = 0;
    while i < b.len() {
        match timestamp_at(b, i) {
            Some(end) => {
                out.push_str(&message[kept..i]);
                // The blank after it goes too; the text around it stays as it was.
                let mut end = end;
                while end < b.len() && b[end] == b' ' {
                    end += 1;
                }
                i = end;
                kept = end;
            }
            None => i += 1,
        }
    }
    out.push_str(&message[kept..]);
    out
}

/// The end of an ISO-8601 timestamp starting at `i` (`YYYY-MM-DD[T ]HH:MM:SS`, then an
/// optional fraction and zone), or `None`.
fn timestamp_at(b: &[u8], i: usize) -> Option<usize> {
    const SHAPE: &[u8] = b"dddd-dd-ddTdd:dd:dd";
    if i > 0 && b[i - 1].is_ascii_digit() {
        return None;
    }
    let head = b.get(i..i + SHAPE.len())?;
    let fits = head.iter().zip(SHAPE).all(|(c, s)| match s {
        b'd' => c.is_ascii_digit(),
        b'T' => *c == b'T' || *c == b' ',
        other => c == other,
    });
    if !fits {
        return None;
    }
    let mut end = i + SHAPE.len();
    let digits = |from: usize| b[from..].iter().take_while(|c| c.is_ascii_digit()).count();
    if b.get(end) == Some(&b'.') && digits(end + 1) > 0 {
        end += 1 + digits(end + 1);
    }
    match b.get(end) {
        Some(b'Z') => end += 1,
        Some(b'+' | b'-') if digits(end + 1) >= 2 => {
            end += 1 + digits(end + 1);
            if b.get(end) == Some(&b':') && digits(end + 1) > 0 {
                end += 1 + digits(end + 1);
            }
        }
        _ => {}
    }
    Some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            ip: Some("10.200.0.5".into()),
            spice_host: Some("192.0.2.10".into()),
            spice_port: Some(5901),
            defined: Some(Cond::new(
                Status::True,
                Reason::Defined,
                "domain ns--a defined",
            )),
            running: Some(Cond::new(Status::True, Reason::Running, "the domain runs")),
            activity: None,
            running_size: Some(Size {
                cpu: 2,
                memory: "2Gi".into(),
            }),
        }
    }

    #[test]
    fn the_same_failure_gives_the_same_message() {
        let qemu = |t: &str| {
            format!(
                "start domain: internal error: QEMU unexpectedly closed the monitor \
                 (vm='t--a'): {t} qemu-system-x86_64: -spice port=5901: Failed to listen"
            )
        };
        let a = without_timestamps(&qemu("2026-12-03T20:01:02.123456Z"));
        let b = without_timestamps(&qemu("2026-12-03T20:01:04.654321Z"));
        assert_eq!(a, b);
        assert!(a.ends_with("(vm='t--a'): qemu-system-x86_64: -spice port=5901: Failed to listen"));
        assert_eq!(
            without_timestamps("at 2026-12-03 20:01:02+01:00 it failed"),
            "at it failed"
        );
        assert_eq!(without_timestamps("ends 2026-12-03T20:01:02"), "ends ");
        // Numbers that are no timestamp stay.
        for kept in [
            "port 5901 busy",
            "12026-12-03T20:01:02",
            "2026-12-03",
            "π 2026-1",
        ] {
            assert_eq!(without_timestamps(kept), kept);
        }
        let c = Cond::new(
            Status::False,
            Reason::StartFailed,
            qemu("2026-12-03T20:01:02Z"),
        );
        assert!(!c.message.contains("2026"), "{}", c.message);
    }

    #[test]
    fn the_running_size_is_kept_until_a_new_one_is_known() {
        let now = Timestamp::UNIX_EPOCH;
        let Some(body) = body(&DesktopStatus::default(), &report(), Some(1), now) else {
            panic!("expected a body");
        };
        assert_eq!(body["runningSize"], json!({"cpu": 2, "memory": "2Gi"}));
        let current: DesktopStatus = serde_json::from_value(body).unwrap_or_else(|e| panic!("{e}"));
        let unknown = Report {
            running_size: None,
            ..report()
        };
        assert_eq!(body_of(&current, &unknown), None, "nothing new to say");
        let off = Report {
            running: Some(Cond::new(Status::False, Reason::Stopped, "off")),
            running_size: None,
            ..report()
        };
        let Some(b) = body_of(&current, &off) else {
            panic!("expected a body");
        };
        assert_eq!(b["runningSize"]["memory"], "2Gi", "an apply never drops it");
    }

    fn body_of(current: &DesktopStatus, r: &Report) -> Option<serde_json::Value> {
        body(current, r, Some(1), Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn a_new_report_is_applied_once() {
        let now = Timestamp::UNIX_EPOCH;
        let body = body(&DesktopStatus::default(), &report(), Some(1), now);
        let Some(body) = body else {
            panic!("expected a body");
        };
        assert_eq!(body["spice"]["uri"], "spice://192.0.2.10:5901");
        assert_eq!(body["ip"], "10.200.0.5");
        assert_eq!(body["conditions"][0]["type"], DOMAIN_DEFINED);
        // Once the object says it, nothing more is written.
        let applied: DesktopStatus = match serde_json::from_value(body) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        let later = Timestamp::from_second(60).unwrap_or(now);
        assert_eq!(super::body(&applied, &report(), Some(1), later), None);
    }

    #[test]
    fn a_released_port_means_no_uri_and_the_host_is_kept() {
        let now = Timestamp::UNIX_EPOCH;
        let released = Report {
            spice_port: None,
            ..report()
        };
        let Some(body) = body(&DesktopStatus::default(), &released, Some(1), now) else {
            panic!("expected a body");
        };
        assert_eq!(body["spice"]["host"], "192.0.2.10");
        assert!(body["spice"].get("uri").is_none(), "{body}");
    }

    #[test]
    fn ipv6_hosts_are_bracketed() {
        assert_eq!(spice_uri("fd00::1", 5900), "spice://[fd00::1]:5900");
    }
}
