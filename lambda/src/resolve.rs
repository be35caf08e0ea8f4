//! Instance -> cluster -> node: what EC2 says about the instance, then which node it is.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aws_sdk_ec2::error::ProvideErrorMetadata;
use tracing::{debug, instrument};

/// The tag EKS managed node groups and eksctl put on instances.
const CLUSTER_NAME_TAG: &str = "eks:cluster-name";
/// The tag the Kubernetes cloud provider and Karpenter use: `kubernetes.io/cluster/<name>`.
const CLUSTER_TAG_PREFIX: &str = "kubernetes.io/cluster/";
/// The tag Auto Scaling puts on every instance of a group.
const ASG_NAME_TAG: &str = "aws:autoscaling:groupName";

/// How long a warm container trusts what EC2 and Auto Scaling said about an instance or
/// group. An instance's zone, name and cluster never change, and its id is never reused;
/// its tags rarely change, and ten minutes bounds how stale a tag change can be. It saves
/// one round trip on every later event about the same instance (Spot warning after a
/// rebalance recommendation, lifecycle hook after a Spot warning).
const CACHE_TTL: Duration = Duration::from_secs(10 * 60);

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("ec2:DescribeInstances for {instance_id} failed: {message}")]
    Describe {
        instance_id: String,
        message: String,
    },
    #[error(
        "autoscaling:DescribeTags of group {group} (instance {instance_id}) failed: {message}"
    )]
    GroupTags {
        instance_id: String,
        group: String,
        message: String,
    },
}

/// What EC2 says about an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    pub instance_id: String,
    pub availability_zone: Option<String>,
    /// EKS names nodes after it unless told otherwise.
    pub private_dns_name: Option<String>,
    pub tags: HashMap<String, String>,
    /// `spot`, `scheduled` or `capacity-block`; `None` for an On-Demand instance.
    pub lifecycle: Option<String>,
    /// `pending`, `running`, `stopping`, `stopped`, `shutting-down` or `terminated`, when it
    /// was described (a cached description's state may be stale).
    pub state: Option<String>,
}

impl InstanceInfo {
    /// The cluster the instance's tags name, if any.
    pub fn cluster_from_tags(&self) -> Option<String> {
        if let Some(name) = self.tags.get(CLUSTER_NAME_TAG) {
            return Some(name.clone());
        }
        self.tags
            .keys()
            .find_map(|k| k.strip_prefix(CLUSTER_TAG_PREFIX))
            .map(str::to_owned)
    }
}

/// A value and when it was learnt.
type Cached<T> = Mutex<HashMap<String, (T, Instant)>>;

fn cached<T: Clone>(cache: &Cached<T>, key: &str) -> Option<T> {
    let cache = cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    cache
        .get(key)
        .filter(|(_, at)| at.elapsed() < CACHE_TTL)
        .map(|(v, _)| v.clone())
}

fn remember<T>(cache: &Cached<T>, key: &str, value: T) {
    let mut cache = cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    cache.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
    cache.insert(key.to_owned(), (value, Instant::now()));
}

#[derive(Debug)]
pub struct Resolver {
    ec2: aws_sdk_ec2::Client,
    asg: aws_sdk_autoscaling::Client,
    instances: Cached<InstanceInfo>,
    /// Whether a group carries the managed tag.
    groups: Cached<bool>,
}

impl Resolver {
    pub fn new(ec2: aws_sdk_ec2::Client, asg: aws_sdk_autoscaling::Client) -> Self {
        Self {
            ec2,
            asg,
            instances: Mutex::default(),
            groups: Mutex::default(),
        }
    }

    /// Does the instance, or its Auto Scaling group, carry the managed tag? The group is asked
    /// only when the instance lacks the tag (groups that do not propagate tags to instances).
    pub async fn is_managed(
        &self,
        instance: &InstanceInfo,
        tag: &str,
    ) -> Result<bool, ResolveError> {
        if instance.tags.contains_key(tag) {
            return Ok(true);
        }
        let Some(group) = instance.tags.get(ASG_NAME_TAG) else {
            return Ok(false);
        };
        if let Some(managed) = cached(&self.groups, group) {
            return Ok(managed);
        }
        let filter = |name: &str, value: &str| {
            aws_sdk_autoscaling::types::Filter::builder()
                .name(name)
                .values(value)
                .build()
        };
        let tags = self
            .asg
            .describe_tags()
            .filters(filter("auto-scaling-group", group))
            .filters(filter("key", tag))
            .send()
            .await
            .map_err(|error| ResolveError::GroupTags {
                instance_id: instance.instance_id.clone(),
                group: group.clone(),
                message: aws_sdk_autoscaling::error::DisplayErrorContext(error).to_string(),
            })?;
        let managed = tags.tags().iter().any(|t| t.key() == Some(tag));
        remember(&self.groups, group, managed);
        Ok(managed)
    }

    /// `None` when EC2 does not know the instance (it terminated more than an hour ago, or
    /// the event came from another account or region): nothing to act on, and no retry helps.
    #[instrument(skip(self))]
    pub async fn describe(&self, instance_id: &str) -> Result<Option<InstanceInfo>, ResolveError> {
        if let Some(info) = cached(&self.instances, instance_id) {
            debug!("instance known from an earlier event");
            return Ok(Some(info));
        }
        self.describe_now(instance_id).await
    }

    /// As [`Resolver::describe`], asking EC2 whatever the cache holds: for the instance's
    /// current state.
    #[instrument(skip(self))]
    pub async fn describe_now(
        &self,
        instance_id: &str,
    ) -> Result<Option<InstanceInfo>, ResolveError> {
        let output = match self
            .ec2
            .describe_instances()
            .instance_ids(instance_id)
            .send()
            .await
        {
            Ok(output) => output,
            Err(error) if error.code() == Some("InvalidInstanceID.NotFound") => {
                debug!("EC2 does not know the instance");
                return Ok(None);
            }
            Err(error) => {
                return Err(ResolveError::Describe {
                    instance_id: instance_id.to_owned(),
                    message: aws_sdk_ec2::error::DisplayErrorContext(error).to_string(),
                })
            }
        };
        let instance = output
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(instance_id));
        let info = instance.map(|i| InstanceInfo {
            instance_id: instance_id.to_owned(),
            availability_zone: i
                .placement()
                .and_then(|p| p.availability_zone())
                .map(str::to_owned),
            private_dns_name: i
                .private_dns_name()
                .filter(|n| !n.is_empty())
                .map(str::to_owned),
            tags: i
                .tags()
                .iter()
                .filter_map(|t| {
                    Some((
                        t.key()?.to_owned(),
                        t.value().unwrap_or_default().to_owned(),
                    ))
                })
                .collect(),
            lifecycle: i.instance_lifecycle().map(|l| l.as_str().to_owned()),
            state: i
                .state()
                .and_then(|s| s.name())
                .map(|n| n.as_str().to_owned()),
        });
        if let Some(info) = &info {
            remember(&self.instances, instance_id, info.clone());
        }
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_tags(tags: &[(&str, &str)]) -> InstanceInfo {
        InstanceInfo {
            instance_id: "i-1".into(),
            availability_zone: None,
            private_dns_name: None,
            lifecycle: None,
            state: None,
            tags: tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn cluster_comes_from_either_tag_convention() {
        assert_eq!(
            with_tags(&[("eks:cluster-name", "prod")])
                .cluster_from_tags()
                .as_deref(),
            Some("prod")
        );
        assert_eq!(
            with_tags(&[("kubernetes.io/cluster/dev", "owned")])
                .cluster_from_tags()
                .as_deref(),
            Some("dev")
        );
        assert_eq!(with_tags(&[("Name", "x")]).cluster_from_tags(), None);
    }
}
