//! How a `meta/v1` Condition is set: the transition time moves only when the status changes,
//! so a reconcile that finds nothing new writes nothing new.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// The three condition statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }

    pub fn from_bool(b: bool) -> Self {
        if b { Status::True } else { Status::False }
    }
}

/// Builds a condition, keeping `lastTransitionTime` from `previous` when the status is unchanged.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: Status,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let last_transition_time = find(previous, type_)
        .filter(|c| c.status == status.as_str())
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.to_string(),
        status: status.as_str().to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation,
        last_transition_time,
    }
}

/// The condition of a type, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of a type is present and `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

/// Replaces or inserts `new` by type, keeping the list sorted by insertion order.
pub fn upsert(conditions: &mut Vec<Condition>, new: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(slot) => *slot = new,
        None => conditions.push(new),
    }
}

/// Whether two condition lists differ in anything but timestamps (a patch is skipped when not).
pub fn differ_ignoring_time(a: &[Condition], b: &[Condition]) -> bool {
    let key = |c: &Condition| {
        (
            c.type_.clone(),
            c.status.clone(),
            c.reason.clone(),
            c.message.clone(),
            c.observed_generation,
        )
    };
    let mut ka: Vec<_> = a.iter().map(key).collect();
    let mut kb: Vec<_> = b.iter().map(key).collect();
    ka.sort();
    kb.sort();
    ka != kb
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn transition_time_kept_while_status_unchanged() {
        let first = condition(&[], "Ready", Status::True, "Up", "", Some(1), at(100));
        let again = condition(
            std::slice::from_ref(&first),
            "Ready",
            Status::True,
            "Up",
            "x",
            Some(2),
            at(200),
        );
        assert_eq!(again.last_transition_time, Time(at(100)));
        let flipped = condition(
            &[again],
            "Ready",
            Status::False,
            "Down",
            "",
            Some(2),
            at(300),
        );
        assert_eq!(flipped.last_transition_time, Time(at(300)));
    }

    #[test]
    fn upsert_and_compare() {
        let mut list = vec![];
        upsert(
            &mut list,
            condition(&[], "A", Status::True, "R", "", None, at(1)),
        );
        upsert(
            &mut list,
            condition(&[], "B", Status::False, "R", "", None, at(1)),
        );
        let mut later = list.clone();
        upsert(
            &mut later,
            condition(&[], "A", Status::True, "R", "", None, at(9)),
        );
        assert_eq!(later.len(), 2);
        assert!(!differ_ignoring_time(&list, &later));
        upsert(
            &mut later,
            condition(&[], "A", Status::False, "R", "", None, at(9)),
        );
        assert!(differ_ignoring_time(&list, &later));
        assert!(is_true(&list, "A") && !is_true(&list, "B") && !is_true(&list, "C"));
    }
}
