//! Instance -> cluster -> node: what EC2 says about the instance, then which node it is.

use std::collections::HashMap;

use aws_sdk_ec2::error::ProvideErrorMetadata;
use tracing::{debug, instrument};

/// The tag EKS managed node groups and eksctl put on instances.
const CLUSTER_NAME_TAG: &str = "eks:cluster-name";
/// The tag the Kubernetes cloud provider and Karpenter use: `kubernetes.io/cluster/<name>`.
const CLUSTER_TAG_PREFIX: &str = "kubernetes.io/cluster/";
/// The tag Auto Scaling puts on every instance of a group.
const ASG_NAME_TAG: &str = "aws:autoscaling:groupName";

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

#[derive(Debug, Clone)]
pub struct Resolver {
    ec2: aws_sdk_ec2::Client,
    asg: aws_sdk_autoscaling::Client,
}

impl Resolver {
    pub fn new(ec2: aws_sdk_ec2::Client, asg: aws_sdk_autoscaling::Client) -> Self {
        Self { ec2, asg }
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
        Ok(tags.tags().iter().any(|t| t.key() == Some(tag)))
    }

    /// `None` when EC2 does not know the instance (it terminated more than an hour ago, or
    /// the event came from another account or region): nothing to act on, and no retry helps.
    #[instrument(skip(self))]
    pub async fn describe(&self, instance_id: &str) -> Result<Option<InstanceInfo>, ResolveError> {
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
        Ok(instance.map(|i| InstanceInfo {
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
        }))
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
