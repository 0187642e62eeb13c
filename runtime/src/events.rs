//! Decides how both binaries record Kubernetes Events: one call that builds the Event,
//! publishes it with the component's reporter, and only logs a failure (an Event is never
//! worth failing a reconcile for).

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};

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
    let recorder = Recorder::new(client.clone(), reporter.clone());
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    let mut reference = obj.object_ref(&());
    // Kubernetes 1.20 refuses an Event in "default" about a cluster-scoped object (a
    // DomainNode, a ResourcePool) unless the reference names that namespace too.
    if reference.namespace.is_none() {
        reference.namespace = Some("default".into());
    }
    if let Err(e) = recorder.publish(&ev, &reference).await {
        tracing::warn!(error = %e, reason, "cannot record Event");
    }
}
