//! The Kubernetes a test runs against: the emulator in [`crate::kube`], or a real control
//! plane from [`crate::envtest`] when `KUBEBUILDER_ASSETS` names one. Tests written against
//! [`Cluster`] run on both, so a behaviour only the emulator believes in shows up as a test
//! that passes on one backend and fails on the other.

use std::time::Duration;

use serde_json::Value;

use crate::envtest::{ControlPlane, RealCluster};
use crate::kube::{AuthConfig, Behaviour, Key, KubeApi};

/// Which Kubernetes a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Emulator,
    Real,
}

impl Backend {
    /// The real control plane, started on first use; `None` when `KUBEBUILDER_ASSETS` is not
    /// set (the test is then skipped with a line saying so).
    pub fn real_available() -> anyhow::Result<bool> {
        Ok(ControlPlane::shared()?.is_some())
    }
}

/// A cluster a test seeds, acts on and inspects.
#[derive(Debug)]
pub enum Cluster {
    Emulator(KubeApi),
    Real(RealCluster),
}

impl Cluster {
    /// A cluster for one test: a fresh emulator, or the binary's real control plane leased
    /// (emptied, and held by this test until the cluster is dropped).
    pub async fn start(
        backend: Backend,
        auth: AuthConfig,
        behaviour: Behaviour,
    ) -> anyhow::Result<Self> {
        Ok(match backend {
            Backend::Emulator => Self::Emulator(KubeApi::start(auth, behaviour).await?),
            Backend::Real => {
                let plane = ControlPlane::shared()?.ok_or_else(|| {
                    anyhow::anyhow!("KUBEBUILDER_ASSETS is not set: no real control plane")
                })?;
                plane.accept_cluster(&auth.cluster_name);
                Self::Real(plane.lease().await?.cluster(behaviour).await?)
            }
        })
    }

    pub fn backend(&self) -> Backend {
        match self {
            Self::Emulator(_) => Backend::Emulator,
            Self::Real(_) => Backend::Real,
        }
    }

    pub fn url(&self) -> &str {
        match self {
            Self::Emulator(api) => &api.url,
            Self::Real(real) => real.url(),
        }
    }

    pub fn ca_pem(&self) -> &str {
        match self {
            Self::Emulator(api) => &api.ca_pem,
            Self::Real(real) => real.ca_pem(),
        }
    }

    /// A client as the function has it: an EKS token for `cluster` from the test credentials,
    /// judged by the cluster's authenticator and, on the real server, by deploy/rbac.yaml.
    pub fn client(&self, cluster: &str) -> anyhow::Result<kube::Client> {
        match self {
            Self::Emulator(api) => crate::kube::client(api, cluster),
            Self::Real(real) => real.plane().eks_client(cluster),
        }
    }

    /// The emulator, for what only it can do (fault injection, request records); `None` on
    /// the real control plane.
    pub fn emulator(&self) -> Option<&KubeApi> {
        match self {
            Self::Emulator(api) => Some(api),
            Self::Real(_) => None,
        }
    }

    pub async fn add_node(&self, node: Value) -> anyhow::Result<()> {
        match self {
            Self::Emulator(api) => {
                api.world(|w| w.add_node(node));
                Ok(())
            }
            Self::Real(real) => real.add_node(node).await,
        }
    }

    pub async fn add_pod(&self, pod: Value) -> anyhow::Result<()> {
        match self {
            Self::Emulator(api) => {
                api.world(|w| w.add_pod(pod));
                Ok(())
            }
            Self::Real(real) => real.add_pod(pod).await,
        }
    }

    pub async fn add_pdb(&self, pdb: Value) -> anyhow::Result<()> {
        match self {
            Self::Emulator(api) => {
                api.world(|w| w.add_pdb(pdb));
                Ok(())
            }
            Self::Real(real) => real.add_pdb(pdb).await,
        }
    }

    /// The node as `kubectl get node -o json` shows it.
    pub async fn node(&self, name: &str) -> anyhow::Result<Option<Value>> {
        match self {
            Self::Emulator(api) => Ok(api.node(name)),
            Self::Real(real) => real.node(name).await,
        }
    }

    /// Changes a node as another writer would (an operator's `kubectl`, a controller): a
    /// strategic-merge patch, applied by the server's own rules.
    pub async fn patch_node(&self, name: &str, patch: Value) -> anyhow::Result<()> {
        match self {
            Self::Emulator(api) => api.patch_node(name, &patch),
            Self::Real(real) => real.patch_node(name, patch).await,
        }
    }

    pub async fn pods_on(&self, node: &str) -> anyhow::Result<Vec<Value>> {
        match self {
            Self::Emulator(api) => Ok(api.pods_on(node)),
            Self::Real(real) => real.pods_on(node).await,
        }
    }

    /// The reasons of the Events about `node`, oldest first.
    pub async fn event_reasons(&self, node: &str) -> anyhow::Result<Vec<String>> {
        match self {
            Self::Emulator(api) => Ok(api.event_reasons(node)),
            Self::Real(real) => real.event_reasons(node).await,
        }
    }

    /// The Events about `node`, oldest first, as `kubectl describe node` shows them.
    pub async fn events_about(&self, node: &str) -> anyhow::Result<Vec<Value>> {
        match self {
            Self::Emulator(api) => Ok(api.world(|w| {
                w.events
                    .iter()
                    .filter(|e| e["involvedObject"]["name"] == node)
                    .cloned()
                    .collect()
            })),
            Self::Real(real) => real.events_about(node).await,
        }
    }

    /// The fewest healthy pods a budget's selector had at any moment of the test.
    pub fn pdb_min_healthy(&self, namespace: &str, name: &str) -> Option<i64> {
        match self {
            Self::Emulator(api) => api.world(|w| {
                w.record
                    .pdb_min_healthy
                    .get(&(namespace.to_owned(), name.to_owned()))
                    .copied()
            }),
            Self::Real(real) => real.pdb_min_healthy(namespace, name),
        }
    }

    /// Tokens the cluster's authenticator was shown.
    pub fn tokens_seen(&self) -> Vec<String> {
        match self {
            Self::Emulator(api) => api.tokens_seen(),
            Self::Real(real) => real.tokens_seen(),
        }
    }

    /// Why the authenticator refused a token, each time it did.
    pub fn auth_failures(&self) -> Vec<String> {
        match self {
            Self::Emulator(api) => api.auth_failures(),
            Self::Real(real) => real.auth_failures(),
        }
    }

    /// Polls `check` on the node until it holds or `patience` runs out.
    pub async fn wait_for_node(
        &self,
        name: &str,
        patience: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let start = std::time::Instant::now();
        loop {
            let node = self.node(name).await?;
            match node {
                Some(node) if check(&node) => return Ok(node),
                Some(node) if start.elapsed() >= patience => {
                    anyhow::bail!("node {name} never reached the expected state: {node:#}")
                }
                None if start.elapsed() >= patience => anyhow::bail!("node {name} is gone"),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// A kubeconfig for nth-agent: on the emulator an EKS token for `cluster`; on the real
    /// server the agent's own ServiceAccount, judged by cluster-agent/deploy/rbac.yaml.
    pub fn agent_kubeconfig(&self, cluster: &str) -> anyhow::Result<Value> {
        match self {
            Self::Emulator(api) => crate::kube::kubeconfig(api, cluster),
            Self::Real(real) => Ok(real.plane().agent_kubeconfig()),
        }
    }

    /// Writes node status as the kubelet does (a new `nodeInfo.bootID` after a reboot):
    /// `patch` (`{"status": {...}}`) merged through the status subresource.
    pub async fn patch_node_status(&self, name: &str, patch: Value) -> anyhow::Result<()> {
        match self {
            Self::Emulator(api) => api
                .world(|w| {
                    w.write(
                        crate::kube::Kind::Node,
                        &(String::new(), name.to_owned()),
                        crate::kube::Part::Status,
                        |node| {
                            crate::kube::patch::merge(node, &patch);
                            Ok(())
                        },
                    )
                })
                .map(drop)
                .map_err(|e| anyhow::anyhow!("writing node {name}'s status: {e:?}")),
            Self::Real(real) => real.patch_node_status(name, patch).await,
        }
    }

    /// Deletes a pod as `kubectl delete pod --grace-period` does: it terminates, and its
    /// kubelet removes it once its containers stopped.
    pub async fn delete_pod(
        &self,
        namespace: &str,
        name: &str,
        grace: Option<i64>,
    ) -> anyhow::Result<()> {
        match self {
            Self::Emulator(api) => {
                let key = (namespace.to_owned(), name.to_owned());
                let timers = api
                    .world(|w| w.delete_pod(&key, grace, None))
                    .map_err(|e| anyhow::anyhow!("deleting pod {namespace}/{name}: {e:?}"))?
                    .1;
                api.start_timers(timers);
                Ok(())
            }
            Self::Real(real) => real.delete_pod(namespace, name, grace).await,
        }
    }

    /// The pods evicted, in order, with the grace period each was given: the emulator's
    /// record of accepted evictions (the grace the eviction asked for); on the real server,
    /// the pods in the order they began terminating, with their `deletionGracePeriodSeconds`.
    pub fn terminations(&self) -> Vec<(Key, Option<i64>)> {
        match self {
            Self::Emulator(api) => api.world(|w| {
                w.record
                    .evictions
                    .iter()
                    .map(|e| (e.key.clone(), e.grace_seconds))
                    .collect()
            }),
            Self::Real(real) => real.terminations(),
        }
    }

    /// Deletes a namespace: evictions there are refused from then on, and the namespace
    /// controller deletes its pods after `lag`.
    pub async fn terminate_namespace(&self, namespace: &str, lag: Duration) -> anyhow::Result<()> {
        match self {
            Self::Emulator(api) => {
                api.terminate_namespace(namespace, lag);
                Ok(())
            }
            Self::Real(real) => real.terminate_namespace(namespace, lag).await,
        }
    }

    /// The real control plane's side of the cluster; `None` on the emulator.
    pub fn real(&self) -> Option<&RealCluster> {
        match self {
            Self::Emulator(_) => None,
            Self::Real(real) => Some(real),
        }
    }

    /// A kubeconfig as an operator has one for an EKS cluster: the server, its CA and a
    /// presigned `k8s-aws-v1.` token for `cluster` (valid 15 minutes) from the test
    /// credentials, judged like the function's own.
    pub fn kubeconfig(&self, cluster: &str) -> anyhow::Result<Value> {
        match self {
            Self::Emulator(api) => crate::kube::kubeconfig(api, cluster),
            Self::Real(real) => real.kubeconfig(cluster),
        }
    }

    /// Deletes the node (its pods stay, as no pod garbage collector runs).
    pub async fn delete_node(&self, name: &str) -> anyhow::Result<()> {
        match self {
            Self::Emulator(api) => api.world(|w| {
                w.nodes
                    .remove(name)
                    .map(drop)
                    .ok_or_else(|| anyhow::anyhow!("no node {name}"))
            }),
            Self::Real(real) => real.delete_node(name).await,
        }
    }

    /// Changes a budget with a merge patch, as `kubectl patch pdb --type merge` does.
    pub async fn patch_pdb(&self, namespace: &str, name: &str, patch: Value) -> anyhow::Result<()> {
        match self {
            Self::Emulator(api) => api.world(|w| {
                let key = (namespace.to_owned(), name.to_owned());
                let mut pdb =
                    w.pdbs.get(&key).cloned().ok_or_else(|| {
                        anyhow::anyhow!("no PodDisruptionBudget {namespace}/{name}")
                    })?;
                crate::kube::patch::merge(&mut pdb, &patch);
                w.add_pdb(pdb);
                Ok(())
            }),
            Self::Real(real) => real.patch_pdb(namespace, name, patch).await,
        }
    }
}

/// Runs an async test body once on each backend: `<name>::emulator` and `<name>::real`. The
/// real one is skipped, with a line saying why, when `KUBEBUILDER_ASSETS` is not set.
#[macro_export]
macro_rules! on_both_backends {
    ($(#[$meta:meta])* async fn $name:ident($backend:ident: Backend) -> anyhow::Result<()> $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            use $crate::cluster::Backend;

            async fn run($backend: Backend) -> anyhow::Result<()> $body

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn emulator() -> anyhow::Result<()> {
                run(Backend::Emulator).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn real() -> anyhow::Result<()> {
                if !Backend::real_available()? {
                    eprintln!("skipped: KUBEBUILDER_ASSETS is not set, so there is no real control plane");
                    return Ok(());
                }
                run(Backend::Real).await
            }
        }
    };
}
