//! How this host joins the cluster: the DomainNode named after the host is created (or updated)
//! with server-side apply under the agent's field manager, owned by the Kubernetes Node of the
//! same name when one exists, and its status carries the agent's report ([`status`]).
//!
//! The agent applies only `metadata` (owner reference, label) and an empty `spec` on the
//! object, so the admin's `spec` fields and the operator's status fields are never touched.

pub mod status;

use std::collections::BTreeMap;
use std::time::Duration;

use deskvirt_crds::constants::{LABEL_MANAGED_BY, MANAGER_AGENT};
use deskvirt_crds::{DomainNode, DomainNodeStatus};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource};
use serde_json::json;

/// The Node that owns the DomainNode, as applied last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Node name.
    pub name: String,
    /// Node UID.
    pub uid: String,
}

/// Why registration failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// Reading the Kubernetes Node failed (other than not found).
    #[error("cannot read Node {name}")]
    ReadNode { name: String, source: kube::Error },
    /// Reading the DomainNode failed.
    #[error("cannot read DomainNode {name}")]
    ReadDomainNode { name: String, source: kube::Error },
    /// Applying the DomainNode failed.
    #[error("cannot apply DomainNode {name}")]
    ApplyDomainNode { name: String, source: kube::Error },
    /// Applying the DomainNode status failed.
    #[error("cannot apply the status of DomainNode {name}")]
    ApplyStatus { name: String, source: kube::Error },
    /// The API server did not answer in time.
    #[error("{op} timed out after {after:?}")]
    Timeout { op: &'static str, after: Duration },
}

impl RegistrationError {
    /// Short category for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            Self::ReadNode { .. } => "ReadNode",
            Self::ReadDomainNode { .. } => "ReadDomainNode",
            Self::ApplyDomainNode { .. } => "ApplyDomainNode",
            Self::ApplyStatus { .. } => "ApplyStatus",
            Self::Timeout { .. } => "Timeout",
        }
    }

    /// Whether the DomainNode is gone (deleted under the agent), so it must be applied again.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::ApplyStatus { source: kube::Error::Api(s), .. } if s.is_not_found())
    }
}

/// Longest wait for one API call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

async fn bounded<T>(
    op: &'static str,
    f: impl Future<Output = Result<T, RegistrationError>>,
) -> Result<T, RegistrationError> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .unwrap_or(Err(RegistrationError::Timeout {
            op,
            after: CALL_TIMEOUT,
        }))
}

/// Writes this host's DomainNode.
#[derive(Clone)]
pub struct Registrar {
    node_name: String,
    labels: BTreeMap<String, String>,
    nodes: Api<Node>,
    domain_nodes: Api<DomainNode>,
}

impl std::fmt::Debug for Registrar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registrar")
            .field("node_name", &self.node_name)
            .finish()
    }
}

impl Registrar {
    /// A registrar for the host `node_name`.
    pub fn new(client: Client, node_name: &str) -> Self {
        Self {
            node_name: node_name.to_string(),
            labels: BTreeMap::new(),
            nodes: Api::all(client.clone()),
            domain_nodes: Api::all(client),
        }
    }

    /// Labels the agent keeps on its DomainNode (such as the pool selector's); the admin's
    /// other labels are left alone.
    pub fn with_labels(mut self, labels: BTreeMap<String, String>) -> Self {
        self.labels = labels;
        self
    }

    fn params() -> PatchParams {
        PatchParams::apply(MANAGER_AGENT).force()
    }

    /// The Kubernetes Node of this host, if it exists.
    pub async fn owner(&self) -> Result<Option<Owner>, RegistrationError> {
        bounded("read Node", async {
            let node = self
                .nodes
                .get_opt(&self.node_name)
                .await
                .map_err(|source| RegistrationError::ReadNode {
                    name: self.node_name.clone(),
                    source,
                })?;
            Ok(node.and_then(|n| {
                Some(Owner {
                    name: n.metadata.name?,
                    uid: n.metadata.uid?,
                })
            }))
        })
        .await
    }

    /// The DomainNode as it is on the server, if it exists.
    pub async fn current(&self) -> Result<Option<DomainNode>, RegistrationError> {
        bounded("read DomainNode", async {
            self.domain_nodes
                .get_opt(&self.node_name)
                .await
                .map_err(|source| RegistrationError::ReadDomainNode {
                    name: self.node_name.clone(),
                    source,
                })
        })
        .await
    }

    /// Creates or updates the DomainNode object (metadata and an empty spec).
    pub async fn apply_domain_node(&self, owner: Option<&Owner>) -> Result<(), RegistrationError> {
        let body = domain_node_patch(&self.node_name, owner, &self.labels);
        bounded("apply DomainNode", async {
            self.domain_nodes
                .patch(&self.node_name, &Self::params(), &Patch::Apply(&body))
                .await
                .map_err(|source| RegistrationError::ApplyDomainNode {
                    name: self.node_name.clone(),
                    source,
                })?;
            Ok(())
        })
        .await
    }

    /// Applies the agent's status fields.
    pub async fn apply_status(&self, status: &DomainNodeStatus) -> Result<(), RegistrationError> {
        let body = status_patch(status);
        bounded("apply DomainNode status", async {
            self.domain_nodes
                .patch_status(&self.node_name, &Self::params(), &Patch::Apply(&body))
                .await
                .map_err(|source| RegistrationError::ApplyStatus {
                    name: self.node_name.clone(),
                    source,
                })?;
            Ok(())
        })
        .await
    }
}

/// The apply body of the DomainNode object: name, label, owner reference, empty spec.
pub fn domain_node_patch(
    name: &str,
    owner: Option<&Owner>,
    labels: &BTreeMap<String, String>,
) -> serde_json::Value {
    let mut all = labels.clone();
    all.insert(LABEL_MANAGED_BY.into(), MANAGER_AGENT.into());
    let owner_references: Vec<serde_json::Value> = owner
        .map(|o| {
            json!({
                "apiVersion": "v1",
                "kind": "Node",
                "name": o.name,
                "uid": o.uid,
            })
        })
        .into_iter()
        .collect();
    json!({
        "apiVersion": DomainNode::api_version(&()),
        "kind": DomainNode::kind(&()),
        "metadata": {
            "name": name,
            "labels": all,
            "ownerReferences": owner_references,
        },
        "spec": {},
    })
}

/// The apply body of the status subresource.
pub fn status_patch(status: &DomainNodeStatus) -> serde_json::Value {
    json!({
        "apiVersion": DomainNode::api_version(&()),
        "kind": DomainNode::kind(&()),
        "status": status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_patch_owns_no_spec_field() {
        let owner = Owner {
            name: "h1".into(),
            uid: "u-1".into(),
        };
        let body = domain_node_patch("h1", Some(&owner), &BTreeMap::new());
        assert_eq!(body["apiVersion"], "deskvirt.io/v1alpha1");
        assert_eq!(body["kind"], "DomainNode");
        assert_eq!(body["spec"], json!({}));
        assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(body["metadata"]["ownerReferences"][0]["kind"], "Node");
        let none = domain_node_patch("h1", None, &BTreeMap::new());
        assert_eq!(none["metadata"]["ownerReferences"], json!([]));
    }

    #[test]
    fn status_patch_has_only_agent_fields() {
        let status = DomainNodeStatus {
            address: Some("10.0.0.1".into()),
            ..DomainNodeStatus::default()
        };
        let body = status_patch(&status);
        assert_eq!(body["status"], json!({ "address": "10.0.0.1" }));
    }
}
