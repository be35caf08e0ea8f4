//! Which cluster an instance belongs to, whether this deployment serves it, and a client
//! for it. One deployment serves one cluster (CLUSTER_NAME) or several (CLUSTERS, a list or
//! `*`); the clients of each cluster are built on first use and kept while the container is
//! warm, with the endpoint and CA from eks:DescribeCluster unless CLUSTER_ENDPOINT gives them.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use aws_credential_types::provider::SharedCredentialsProvider;
use nth_core::{DrainSettings, Drainer, NodeEvents, NodeMarker, Policy};
use serde_json::Value;
use tokio::sync::OnceCell;
use tracing::{info, instrument};

use crate::cluster::{self, ClusterError};
use crate::resolve::InstanceInfo;
use crate::signed::{self, SignedCall};
use crate::token::TokenSource;

/// The clusters a deployment acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Served {
    /// CLUSTER_NAME: one cluster. An instance with no cluster tag is taken to be in it (the
    /// managed-tag check still applies); one tagged for another cluster is left alone.
    One(String),
    /// CLUSTERS=a,b: the instance's tags name its cluster, which must be listed.
    Listed(BTreeSet<String>),
    /// CLUSTERS=*: whatever cluster the instance's tags name, if this account has it.
    Any,
}

impl Served {
    /// The cluster to act in for an instance whose tags name `tagged`, or why none.
    pub fn choose<'a>(&'a self, tagged: Option<&'a str>) -> Result<&'a str, String> {
        match (self, tagged) {
            (Self::One(name), None) => Ok(name),
            (Self::One(name), Some(other)) if other != name => {
                Err(format!("instance belongs to cluster {other}"))
            }
            (Self::One(name), Some(_)) => Ok(name),
            (Self::Listed(_) | Self::Any, None) => Err(
                "instance has no cluster tag (eks:cluster-name or kubernetes.io/cluster/<name>); \
                 with CLUSTERS its tags name its cluster"
                    .into(),
            ),
            (Self::Listed(names), Some(tagged)) if !names.contains(tagged) => Err(format!(
                "instance belongs to cluster {tagged}, which is not in CLUSTERS"
            )),
            (Self::Listed(_) | Self::Any, Some(tagged)) => Ok(tagged),
        }
    }
}

/// The clients for one cluster.
#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub marker: NodeMarker,
    pub drainer: Drainer,
    pub events: NodeEvents,
}

impl Cluster {
    /// One cluster's clients. `among_several`: the deployment serves several clusters, so a
    /// node is only taken for an instance when its providerID names it (see
    /// [`NodeMarker::requiring_provider_id`]).
    pub fn new(
        name: String,
        client: kube::Client,
        policy: &Policy,
        drain: &DrainSettings,
        among_several: bool,
    ) -> Self {
        let marker = NodeMarker::new(client.clone(), policy.clone());
        Self {
            name,
            marker: if among_several {
                marker.requiring_provider_id()
            } else {
                marker
            },
            events: NodeEvents::new(client.clone(), policy.dry_run),
            drainer: Drainer::new(client, drain.clone()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("eks:DescribeCluster of {cluster} (for instance {instance_id}) failed: {message}")]
    Describe {
        cluster: String,
        instance_id: String,
        message: String,
    },
    #[error("cluster {cluster} (for instance {instance_id}): {source}")]
    Client {
        cluster: String,
        instance_id: String,
        #[source]
        source: ClusterError,
    },
}

/// Where an instance's node lives, as far as this deployment is concerned.
#[derive(Debug)]
pub enum Choice {
    Serve(Arc<Cluster>),
    /// Not this deployment's instance, and why.
    NotOurs(String),
}

/// What building a cluster's client needs beyond its endpoint.
#[derive(Debug, Clone)]
pub struct Discovery {
    pub aws: aws_config::SdkConfig,
    pub credentials: SharedCredentialsProvider,
    pub region: String,
    pub policy: Policy,
    pub drain: DrainSettings,
}

/// The clusters of one deployment, each built once per container.
#[derive(Debug)]
pub struct Clusters {
    served: Served,
    /// The one cluster's clients when its endpoint was configured (or a kubeconfig given);
    /// otherwise clusters are looked up with eks:DescribeCluster.
    fixed: Option<Arc<Cluster>>,
    discovery: Discovery,
    known: Mutex<HashMap<String, Arc<OnceCell<Arc<Cluster>>>>>,
}

/// What eks:DescribeCluster answers when the cluster is not in this account and region.
const NOT_FOUND: &str = "ResourceNotFoundException";

impl Clusters {
    pub fn new(served: Served, fixed: Option<Cluster>, discovery: Discovery) -> Self {
        Self {
            served,
            fixed: fixed.map(Arc::new),
            discovery,
            known: Mutex::default(),
        }
    }

    /// The cluster `instance` belongs to, if this deployment serves it.
    pub async fn for_instance(&self, instance: &InstanceInfo) -> Result<Choice, LookupError> {
        let tagged = instance.cluster_from_tags();
        let name = match self.served.choose(tagged.as_deref()) {
            Ok(name) => name.to_owned(),
            Err(why) => return Ok(Choice::NotOurs(why)),
        };
        if let Some(fixed) = &self.fixed {
            return Ok(Choice::Serve(Arc::clone(fixed)));
        }
        let cell = {
            let mut known = self
                .known
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            Arc::clone(known.entry(name.clone()).or_default())
        };
        // One DescribeCluster per cluster however many interruptions ask at once; a failure
        // is not kept, so the next event (or the retry) asks again.
        let built = cell
            .get_or_try_init(|| self.build(&name, &instance.instance_id))
            .await;
        match built {
            Ok(cluster) => Ok(Choice::Serve(Arc::clone(cluster))),
            Err(Some(error)) => Err(error),
            Err(None) => Ok(Choice::NotOurs(format!(
                "instance belongs to cluster {name}, which is not in this account and region"
            ))),
        }
    }

    /// Describes and connects to `name`; `Err(None)` when EKS has no such cluster.
    #[instrument(skip(self))]
    async fn build(
        &self,
        name: &str,
        instance_id: &str,
    ) -> Result<Arc<Cluster>, Option<LookupError>> {
        let describe_error = |message: String| {
            Some(LookupError::Describe {
                cluster: name.to_owned(),
                instance_id: instance_id.to_owned(),
                message,
            })
        };
        let d = &self.discovery;
        let path = format!("/clusters/{}", signed::path_segment(name));
        let answer = signed::send(
            &d.aws,
            SignedCall {
                action: "eks:DescribeCluster",
                service: "eks",
                method: "GET",
                path: &path,
                headers: &[],
                body: String::new(),
            },
        )
        .await
        .map_err(describe_error)?;
        if answer.status == http::StatusCode::NOT_FOUND || answer.error_code() == Some(NOT_FOUND) {
            return Err(None);
        }
        if !answer.status.is_success() {
            return Err(describe_error(answer.error()));
        }
        let cluster = &answer.body["cluster"];
        let field = |pointer: &str| cluster.pointer(pointer).and_then(Value::as_str);
        let (Some(endpoint), Some(ca_data)) =
            (field("/endpoint"), field("/certificateAuthority/data"))
        else {
            return Err(describe_error(format!(
                "the answer has no endpoint or certificateAuthority.data (cluster status {})",
                field("/status").unwrap_or("unknown")
            )));
        };
        let tokens = Arc::new(TokenSource::new(
            name.to_owned(),
            d.region.clone(),
            d.credentials.clone(),
        ));
        let client = cluster::eks_client(endpoint, ca_data, tokens).map_err(|source| {
            Some(LookupError::Client {
                cluster: name.to_owned(),
                instance_id: instance_id.to_owned(),
                source,
            })
        })?;
        info!(cluster = name, endpoint, "cluster described; client ready");
        Ok(Arc::new(Cluster::new(
            name.to_owned(),
            client,
            &d.policy,
            &d.drain,
            !matches!(self.served, Served::One(_)),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(names: &[&str]) -> Served {
        Served::Listed(names.iter().map(|n| (*n).to_owned()).collect())
    }

    #[test]
    fn one_cluster_takes_untagged_instances_and_refuses_other_clusters() {
        let one = Served::One("prod".into());
        assert_eq!(one.choose(None), Ok("prod"));
        assert_eq!(one.choose(Some("prod")), Ok("prod"));
        assert!(one
            .choose(Some("dev"))
            .expect_err("refused")
            .contains("dev"));
    }

    #[test]
    fn a_list_needs_the_tag_to_name_a_listed_cluster() {
        let served = listed(&["blue", "green"]);
        assert_eq!(served.choose(Some("green")), Ok("green"));
        assert!(served
            .choose(Some("red"))
            .expect_err("refused")
            .contains("not in CLUSTERS"));
        assert!(served
            .choose(None)
            .expect_err("refused")
            .contains("no cluster tag"));
        assert_eq!(Served::Any.choose(Some("red")), Ok("red"));
        assert!(Served::Any.choose(None).is_err());
    }
}
