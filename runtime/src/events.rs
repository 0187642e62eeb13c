//! Decides how both binaries record Kubernetes Events: one call that builds the Event,
//! publishes it under the component's reporter, and only logs a failure (an Event is never
//! worth failing a reconcile for). An object whose name is too long for `<name>.<time>` (a
//! Desktop may have 253 characters) gets an Event with a generated name instead.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::runtime::events::{EventType, Reporter};
use kube::{Api, Client, Resource};

/// Longest object name: a DNS subdomain.
const MAX_NAME: usize = 253;

/// The Event's name (`<object>.<nanoseconds in hex>`, as kube's recorder names it), or, when
/// that would be too long, a prefix of the object's name for the apiserver to complete.
fn event_name(object: &str, now: Timestamp) -> (Option<String>, Option<String>) {
    let name = format!("{object}.{:x}", now.as_nanosecond());
    if name.len() <= MAX_NAME {
        return (Some(name), None);
    }
    // generateName gets 5 random characters appended; it may end with `-`, not with `.`.
    let prefix: String = object.chars().take(MAX_NAME - 6).collect();
    let prefix = prefix.trim_end_matches(['.', '-']);
    (None, Some(format!("{prefix}-")))
}

/// Builds the Event about `reference`.
fn build(
    reporter: &Reporter,
    reference: ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
    now: Timestamp,
) -> K8sEvent {
    let object = reference
        .name
        .clone()
        .unwrap_or_else(|| reporter.controller.clone());
    let (name, generate_name) = event_name(&object, now);
    K8sEvent {
        action: Some(action.into()),
        reason: Some(reason.into()),
        event_time: Some(MicroTime(now)),
        note: Some(note),
        reporting_controller: Some(reporter.controller.clone()),
        reporting_instance: Some(
            reporter
                .instance
                .clone()
                .unwrap_or_else(|| reporter.controller.clone()),
        ),
        type_: Some(
            match type_ {
                EventType::Normal => "Normal",
                EventType::Warning => "Warning",
            }
            .into(),
        ),
        metadata: ObjectMeta {
            namespace: reference.namespace.clone(),
            name,
            generate_name,
            ..Default::default()
        },
        regarding: Some(reference),
        ..Default::default()
    }
}

/// Records an Event about `obj`; failures are logged at warn level, never returned.
pub async fn publish<K: Resource<DynamicType = ()>>(
    client: &Client,
    reporter: &Reporter,
    obj: &K,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let mut reference = obj.object_ref(&());
    // Kubernetes 1.20 refuses an Event in "default" about a cluster-scoped object (a
    // DomainNode, a ResourcePool) unless the reference names that namespace too.
    if reference.namespace.is_none() {
        reference.namespace = Some("default".into());
    }
    let namespace = reference.namespace.clone().unwrap_or_default();
    let event = build(
        reporter,
        reference,
        type_,
        reason,
        action,
        note,
        Timestamp::now(),
    );
    let api: Api<K8sEvent> = Api::namespaced(client.clone(), &namespace);
    if let Err(e) = api.create(&PostParams::default(), &event).await {
        tracing::warn!(error = %e, reason, "cannot record Event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_kept_and_long_ones_generated() {
        let now = Timestamp::UNIX_EPOCH;
        assert_eq!(event_name("alice", now), (Some("alice.0".into()), None));
        let long = "a".repeat(253);
        let (name, generate) = event_name(&long, now);
        assert_eq!(name, None);
        let generate = generate.unwrap_or_default();
        assert!(generate.len() + 5 <= MAX_NAME, "{}", generate.len());
        assert!(generate.ends_with('-'));
    }
}
