//! A whole emulated world: moto with the instance, the API server with its node and pods,
//! and the real `nth-lambda` under the Runtime API emulator. The end-to-end tests and the
//! README's sandbox command both start it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use chrono::{SecondsFormat, Utc};
use serde_json::{json, Value};

use crate::autoscaling::AwsFront;
use crate::cluster::{Backend, Cluster};
use crate::fixtures;
use crate::kube::{AuthConfig, Behaviour};
use crate::moto::{Instance, Moto};
use crate::process::Process;
use crate::runtime_api::{Outcome, RuntimeApi};
use crate::{TEST_ACCESS_KEY, TEST_REGION, TEST_SECRET_KEY, TEST_SESSION_TOKEN};

pub const CLUSTER: &str = "sandbox";
/// Where the ReplicaSet controller puts replacements of evicted pods.
pub const SPARE_NODE: &str = "ip-10-0-200-1.ec2.internal";
pub const APP_NAMESPACE: &str = "shop";
pub const PDB_NAME: &str = "checkout";
/// The function timeout the sandbox invokes with, as a SAM deployment would set it.
pub const FUNCTION_TIMEOUT: Duration = Duration::from_secs(300);
/// The tag that makes an instance one nth may act on (the default MANAGED_TAG).
pub const MANAGED_TAG: &str = "node-termination-handler/managed";

/// How the emulated cluster behaves in the sandbox: pods stop quickly, replacements of
/// evicted pods go to the spare node and turn Ready after 1.5 s.
pub fn sandbox_behaviour() -> Behaviour {
    Behaviour {
        spare_node: Some(SPARE_NODE.to_owned()),
        replacement_ready_delay: Duration::from_millis(1500),
        ..Behaviour::default()
    }
}

#[derive(Debug)]
pub struct Sandbox {
    pub moto: Moto,
    /// The AWS endpoint the function uses: moto, plus the lifecycle calls moto lacks.
    pub aws: AwsFront,
    pub kube: Cluster,
    pub runtime: RuntimeApi,
    /// The function's execution environment; replaced when an invocation times out.
    pub lambda: Arc<Process>,
    pub instance: Instance,
}

impl Sandbox {
    /// Starts everything and seeds the cluster: the instance's node with one DaemonSet pod,
    /// one mirror pod and eight ReplicaSet pods, two of them under a PDB allowing one
    /// disruption at a time; plus a spare node for replacements. `env` adds to or overrides
    /// the function's environment.
    pub async fn start(env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_on(Backend::Emulator, env, sandbox_behaviour()).await
    }

    /// As [`Sandbox::start`], with the emulated cluster behaving as `behaviour` says.
    pub async fn start_with(env: &[(&str, &str)], behaviour: Behaviour) -> anyhow::Result<Self> {
        Self::start_on(Backend::Emulator, env, behaviour).await
    }

    /// As [`Sandbox::start_with`], on either backend: the real control plane's kubelet and
    /// ReplicaSet stand-in follows `behaviour` as the emulator does.
    pub async fn start_on(
        backend: Backend,
        env: &[(&str, &str)],
        behaviour: Behaviour,
    ) -> anyhow::Result<Self> {
        let moto = Moto::start().await?;
        let aws = AwsFront::start(&moto.endpoint).await?;
        let instance = moto
            .run_instance(
                "us-east-1a",
                &[
                    ("eks:cluster-name", CLUSTER),
                    (MANAGED_TAG, "true"),
                    ("Name", "sandbox-spot"),
                ],
            )
            .await?;
        let kube = Cluster::start(
            backend,
            AuthConfig {
                cluster_name: CLUSTER.to_owned(),
                secret_access_key: Some(TEST_SECRET_KEY.to_owned()),
            },
            behaviour,
        )
        .await?;
        let node = instance.private_dns_name.clone();
        kube.add_node(fixtures::node(
            &node,
            &instance.id,
            &instance.availability_zone,
        ))
        .await?;
        kube.add_node(fixtures::node(
            SPARE_NODE,
            "i-0ffffffffffffffff",
            "us-east-1b",
        ))
        .await?;
        kube.add_pod(fixtures::daemonset_pod("kube-system", "aws-node", &node))
            .await?;
        kube.add_pod(fixtures::mirror_pod("kube-system", "kube-proxy", &node))
            .await?;
        for i in 0..6 {
            kube.add_pod(fixtures::replicaset_pod(
                APP_NAMESPACE,
                "web-5d9f7",
                i,
                &node,
                "web",
            ))
            .await?;
        }
        for i in 0..2 {
            kube.add_pod(fixtures::replicaset_pod(
                APP_NAMESPACE,
                "checkout-6c8d",
                i,
                &node,
                "checkout",
            ))
            .await?;
        }
        kube.add_pdb(fixtures::pdb_max_unavailable(
            APP_NAMESPACE,
            PDB_NAME,
            "checkout",
            1,
        ))
        .await?;
        aws.add_cluster(CLUSTER, kube.url(), kube.ca_pem());
        let runtime = RuntimeApi::start().await?;
        let queue = runtime.queue();
        queue.set_timeout(FUNCTION_TIMEOUT);
        aws.on_invoke(move |payload| queue.invoke_async(payload));
        let mut vars = handler_env(&aws, &kube);
        vars.extend(lambda_env(&runtime));
        for (k, v) in env {
            vars.insert((*k).to_owned(), (*v).to_owned());
        }
        let lambda = Arc::new(Process::spawn("nth-lambda", &[], &vars)?);
        let environment = Arc::clone(&lambda);
        runtime.queue().on_timeout(move || {
            if let Err(error) = environment.restart() {
                tracing::error!(%error, "replacing the timed-out function");
            }
        });
        Ok(Self {
            moto,
            aws,
            kube,
            runtime,
            lambda,
            instance,
        })
    }

    /// The emulator, for a test that only it can serve (fault injection, request records).
    /// Panics on the real control plane: such a test runs on the emulator only.
    pub fn emulator(&self) -> &crate::kube::KubeApi {
        self.kube
            .emulator()
            .expect("this test needs the emulator's fault injection or request records")
    }

    pub fn node_name(&self) -> &str {
        &self.instance.private_dns_name
    }

    /// A Spot interruption warning for the sandbox's instance, sent now.
    pub fn spot_event(&self, id: &str) -> Value {
        event(
            id,
            "aws.ec2",
            "EC2 Spot Instance Interruption Warning",
            &self.instance.id,
            json!({ "instance-id": self.instance.id, "instance-action": "terminate" }),
        )
    }

    /// Another instance in moto (tagged for the sandbox's cluster and managed unless `tags`
    /// says otherwise) with a Ready node and `pods` ReplicaSet pods in the cluster.
    pub async fn add_instance_node(
        &self,
        tags: &[(&str, &str)],
        pods: usize,
    ) -> anyhow::Result<Instance> {
        let mut all: Vec<(&str, &str)> = vec![("eks:cluster-name", CLUSTER), (MANAGED_TAG, "true")];
        for (k, v) in tags {
            all.retain(|(key, _)| key != k);
            all.push((k, v));
        }
        all.retain(|(_, v)| !v.is_empty());
        let instance = self.moto.run_instance("us-east-1b", &all).await?;
        self.add_node(&instance, pods).await?;
        Ok(instance)
    }

    /// An On-Demand instance of the sandbox's cluster, managed, with a Ready node and `pods`
    /// ReplicaSet pods.
    pub async fn add_on_demand_instance_node(&self, pods: usize) -> anyhow::Result<Instance> {
        let instance = self
            .moto
            .run_on_demand_instance(
                "us-east-1b",
                &[("eks:cluster-name", CLUSTER), (MANAGED_TAG, "true")],
            )
            .await?;
        self.add_node(&instance, pods).await?;
        Ok(instance)
    }

    pub async fn invoke(&self, event: Value) -> anyhow::Result<Outcome> {
        self.runtime.invoke(event, FUNCTION_TIMEOUT).await
    }

    /// Another managed instance of the sandbox's cluster, with no node (yet).
    pub async fn managed_instance_without_node(&self) -> anyhow::Result<Instance> {
        self.moto
            .run_instance(
                "us-east-1a",
                &[("eks:cluster-name", CLUSTER), (MANAGED_TAG, "true")],
            )
            .await
    }

    /// A Ready node in the cluster for `instance`, with a DaemonSet pod and `pods` ReplicaSet
    /// pods (label app=api).
    pub async fn add_node(&self, instance: &Instance, pods: usize) -> anyhow::Result<()> {
        add_node_to(&self.kube, instance, pods).await
    }

    /// The environment for running `nth-lambda explain` or `replay` against this world.
    pub fn cli_env(&self) -> BTreeMap<String, String> {
        handler_env(&self.aws, &self.kube)
    }
}

/// A Ready node in `cluster` for `instance`, with a DaemonSet pod and `pods` ReplicaSet pods
/// (label app=api).
pub async fn add_node_to(
    cluster: &Cluster,
    instance: &Instance,
    pods: usize,
) -> anyhow::Result<()> {
    let node = instance.private_dns_name.clone();
    cluster
        .add_node(fixtures::node(
            &node,
            &instance.id,
            &instance.availability_zone,
        ))
        .await?;
    cluster
        .add_pod(fixtures::daemonset_pod("kube-system", "aws-node", &node))
        .await?;
    let rs = format!("api-{}", &instance.id[2..8]);
    for i in 0..pods {
        cluster
            .add_pod(fixtures::replicaset_pod(
                APP_NAMESPACE,
                &rs,
                i,
                &node,
                "api",
            ))
            .await?;
    }
    Ok(())
}

/// The invocation's answer; a failed invocation fails the test, with the function's log.
pub fn response(outcome: Outcome, sandbox: &Sandbox) -> Value {
    match outcome {
        Outcome::Response(v) => v,
        Outcome::Error {
            error_type,
            message,
        } => panic!(
            "invocation failed: {error_type}: {message}\nlogs:\n{}",
            sandbox.lambda.output().join("\n")
        ),
    }
}

/// An EventBridge event about `instance_id`, sent now.
pub fn event(id: &str, source: &str, detail_type: &str, instance_id: &str, detail: Value) -> Value {
    json!({
        "version": "0",
        "id": id,
        "detail-type": detail_type,
        "source": source,
        "account": "123456789012",
        "time": Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
        "region": TEST_REGION,
        "resources": [format!("arn:aws:ec2:{TEST_REGION}:123456789012:instance/{instance_id}")],
        "detail": detail,
    })
}

/// What the Lambda service sets for a function: the Runtime API and the function's identity.
fn lambda_env(runtime: &RuntimeApi) -> BTreeMap<String, String> {
    [
        ("AWS_LAMBDA_RUNTIME_API", runtime.address.as_str()),
        ("AWS_LAMBDA_FUNCTION_NAME", "nth"),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128"),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
        ("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/nth"),
        ("AWS_LAMBDA_LOG_STREAM_NAME", "2026/11/25/[$LATEST]sandbox"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// AWS settings pointing at the emulated endpoint, and nth's settings for this world's cluster.
fn handler_env(aws: &AwsFront, kube: &Cluster) -> BTreeMap<String, String> {
    let ca_data = base64::engine::general_purpose::STANDARD.encode(kube.ca_pem());
    [
        ("AWS_REGION", TEST_REGION),
        ("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY),
        ("AWS_SESSION_TOKEN", TEST_SESSION_TOKEN),
        ("AWS_ENDPOINT_URL", aws.endpoint.as_str()),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("CLUSTER_NAME", CLUSTER),
        ("CLUSTER_ENDPOINT", kube.url()),
        ("CLUSTER_CA_DATA", ca_data.as_str()),
        // Faster than the 5 s default, so the PDB-guarded pods move within seconds.
        ("EVICTION_RETRY_SECONDS", "1"),
        ("LOG_LEVEL", "info"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}
