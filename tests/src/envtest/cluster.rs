//! A test's turn on the shared control plane: the wipe that gives it a clean cluster, and the
//! seeding and reading the emulator's tests do, against the real server.

use std::collections::HashMap;
use std::fmt::Debug;
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Event, Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Resource;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::OwnedMutexGuard;

use super::kubelet::{self, Observer};
use super::ControlPlane;
use crate::kube::state::{key_of, Behaviour, Key};

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A test's exclusive turn on the control plane, which it found wiped.
#[derive(Debug)]
pub struct Lease {
    plane: &'static ControlPlane,
    _turn: OwnedMutexGuard<()>,
    wipe_took: Duration,
}

impl Lease {
    pub(super) async fn take(plane: &'static ControlPlane) -> anyhow::Result<Self> {
        let turn = std::sync::Arc::clone(&plane.turn).lock_owned().await;
        // The last lease's stand-in must not write into this one's cluster.
        let previous = lock(&plane.stand_in).take();
        if let Some(previous) = previous {
            previous.abort();
            let _cancelled = previous.await;
        }
        {
            let mut seen = plane.authn.seen();
            seen.tokens.clear();
            seen.failures.clear();
        }
        let began = Instant::now();
        wipe(&plane.admin).await.context("wiping the cluster")?;
        Ok(Self {
            plane,
            _turn: turn,
            wipe_took: began.elapsed(),
        })
    }

    /// How long the wipe took.
    pub fn wipe_took(&self) -> Duration {
        self.wipe_took
    }

    /// Starts the kubelet and ReplicaSet controller stand-in with `behaviour`, for as long
    /// as the returned cluster lives.
    pub async fn cluster(self, behaviour: Behaviour) -> anyhow::Result<RealCluster> {
        let observer = Observer::new();
        let stand_in = self.plane.runtime.spawn(kubelet::run(
            self.plane.admin.clone(),
            behaviour,
            observer.clone(),
        ));
        let abort = stand_in.abort_handle();
        *lock(&self.plane.stand_in) = Some(stand_in);
        let cluster = RealCluster {
            lease: self,
            observer,
            stand_in: abort,
            replicasets: tokio::sync::Mutex::new(HashMap::new()),
        };
        // Its first list: from then on, every write is seen.
        cluster.observer.wait_for(1).await?;
        Ok(cluster)
    }
}

/// Deletes what tests create: every Node, and in every namespace every Pod (at once, with no
/// grace), PodDisruptionBudget, ReplicaSet and Event. Namespaces stay, emptied: deleting one
/// needs the namespace controller, and it takes seconds, and a namespace being deleted
/// refuses new pods.
async fn wipe(client: &kube::Client) -> anyhow::Result<()> {
    let now = &DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    let everything = ListParams::default();
    Api::<Node>::all(client.clone())
        .delete_collection(now, &everything)
        .await
        .context("deleting nodes")?;
    let namespaces = Api::<Namespace>::all(client.clone())
        .list(&everything)
        .await
        .context("listing namespaces")?;
    let names: Vec<String> = namespaces
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    futures::future::try_join_all(names.iter().map(|ns| async move {
        tokio::try_join!(
            delete_all::<Pod>(client, ns, now),
            delete_all::<PodDisruptionBudget>(client, ns, now),
            delete_all::<ReplicaSet>(client, ns, now),
            delete_all::<Event>(client, ns, now),
        )
    }))
    .await?;
    Ok(())
}

async fn delete_all<K>(
    client: &kube::Client,
    namespace: &str,
    now: &DeleteParams,
) -> anyhow::Result<()>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug,
{
    Api::<K>::namespaced(client.clone(), namespace)
        .delete_collection(now, &ListParams::default())
        .await
        .with_context(|| format!("deleting {} in {namespace}", K::plural(&())))?;
    Ok(())
}

/// Success for a create that found the object there already.
fn exists<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        other => other.map(drop),
    }
}

fn resource_version<K: Resource>(object: &K) -> u64 {
    object
        .meta()
        .resource_version
        .as_deref()
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0)
}

/// The taint the API server puts on every new node until it is Ready.
const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";

/// The real cluster as a test sees it through its lease, with the emulator's seeding and
/// reading operations. Pods are played by a kubelet stand-in following the lease's
/// [`Behaviour`].
#[derive(Debug)]
pub struct RealCluster {
    lease: Lease,
    observer: Observer,
    stand_in: tokio::task::AbortHandle,
    /// How many pods were added for each ReplicaSet: its replicas.
    replicasets: tokio::sync::Mutex<HashMap<Key, i32>>,
}

impl Drop for RealCluster {
    fn drop(&mut self) {
        self.stand_in.abort();
    }
}

impl RealCluster {
    pub fn plane(&self) -> &'static ControlPlane {
        self.lease.plane
    }

    fn client(&self) -> kube::Client {
        self.lease.plane.admin.clone()
    }

    /// Creates the node, then writes its status, which a create drops.
    /// Creates the node, then writes its status, which a create drops. The API server's
    /// admission taints every new node `node.kubernetes.io/not-ready`; the node lifecycle
    /// controller (not run here) lifts it once the node is Ready, so the rig does that too,
    /// leaving the node as a Ready node of a real cluster is.
    pub async fn add_node(&self, mut node: Value) -> anyhow::Result<()> {
        let status = node.as_object_mut().and_then(|n| n.remove("status"));
        let api: Api<Node> = Api::all(self.client());
        let created = api
            .create(&PostParams::default(), &serde_json::from_value(node)?)
            .await
            .context("creating the node")?;
        let name = created.metadata.name.clone().unwrap_or_default();
        let Some(status) = status else {
            return Ok(());
        };
        let ready = status["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        });
        let written = api
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
            .with_context(|| format!("writing node {name}'s status"))?;
        if ready {
            let taints: Vec<_> = written
                .spec
                .and_then(|s| s.taints)
                .unwrap_or_default()
                .into_iter()
                .filter(|t| t.key != NOT_READY_TAINT)
                .collect();
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Strategic(json!({
                    "metadata": {"resourceVersion": written.metadata.resource_version},
                    "spec": {"taints": taints},
                })),
            )
            .await
            .with_context(|| format!("lifting node {name}'s not-ready taint"))?;
        }
        Ok(())
    }

    /// Creates the pod (its namespace too, if need be) and writes its status. A pod of a
    /// ReplicaSet gets a real one, with as many replicas as pods were added for it, and
    /// points at it by uid: the disruption controller resolves a budget's `maxUnavailable`
    /// through the pods' controller and refuses every eviction when it cannot.
    /// Returns once the kubelet stand-in and the budget observer have seen the pod.
    pub async fn add_pod(&self, mut pod: Value) -> anyhow::Result<()> {
        let (namespace, name) = key_of(&pod);
        pod["metadata"]["namespace"] = json!(namespace);
        self.ensure_namespace(&namespace).await?;
        let owner = pod["metadata"]["ownerReferences"]
            .as_array()
            .and_then(|owners| {
                owners
                    .iter()
                    .position(|o| o["kind"] == "ReplicaSet" && o["controller"] == true)
            });
        if let Some(index) = owner {
            let replicaset = pod["metadata"]["ownerReferences"][index]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let uid = self.replicaset_for(&namespace, &replicaset, &pod).await?;
            pod["metadata"]["ownerReferences"][index]["uid"] = json!(uid);
        }
        let status = pod.as_object_mut().and_then(|p| p.remove("status"));
        let api: Api<Pod> = Api::namespaced(self.client(), &namespace);
        let mut written = api
            .create(&PostParams::default(), &serde_json::from_value(pod)?)
            .await
            .with_context(|| format!("creating pod {namespace}/{name}"))?;
        if let Some(status) = status {
            written = api
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": status})),
                )
                .await
                .with_context(|| format!("writing pod {namespace}/{name}'s status"))?;
        }
        self.observer.wait_for(resource_version(&written)).await
    }

    /// The ReplicaSet `name`, created from `pod` or scaled up by one; its uid.
    async fn replicaset_for(
        &self,
        namespace: &str,
        name: &str,
        pod: &Value,
    ) -> anyhow::Result<String> {
        let mut replicasets = self.replicasets.lock().await;
        let replicas = replicasets
            .entry((namespace.to_owned(), name.to_owned()))
            .or_insert(0);
        *replicas += 1;
        let api: Api<ReplicaSet> = Api::namespaced(self.client(), namespace);
        let replicaset = if *replicas == 1 {
            let labels = &pod["metadata"]["labels"];
            let mut spec = pod["spec"].clone();
            if let Some(spec) = spec.as_object_mut() {
                spec.remove("nodeName");
            }
            let replicaset = json!({
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": labels},
                    "template": {"metadata": {"labels": labels}, "spec": spec},
                },
            });
            api.create(&PostParams::default(), &serde_json::from_value(replicaset)?)
                .await
        } else {
            let scale = json!({"spec": {"replicas": *replicas}});
            api.patch(name, &PatchParams::default(), &Patch::Merge(scale))
                .await
        }
        .with_context(|| format!("creating or scaling ReplicaSet {namespace}/{name}"))?;
        replicaset
            .metadata
            .uid
            .context("a ReplicaSet without a uid")
    }

    /// The namespace, with the `default` ServiceAccount the ServiceAccount admission plugin
    /// gives pods (the controller that creates it does not run).
    async fn ensure_namespace(&self, namespace: &str) -> anyhow::Result<()> {
        if lock(&self.lease.plane.namespaces).contains(namespace) {
            return Ok(());
        }
        exists(
            Api::<Namespace>::all(self.client())
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": namespace}}))?,
                )
                .await,
        )
        .with_context(|| format!("creating namespace {namespace}"))?;
        exists(
            Api::<ServiceAccount>::namespaced(self.client(), namespace)
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": "default"}}))?,
                )
                .await,
        )
        .with_context(|| format!("creating {namespace}'s default ServiceAccount"))?;
        lock(&self.lease.plane.namespaces).insert(namespace.to_owned());
        Ok(())
    }

    /// Creates the budget and starts observing its pods' health.
    pub async fn add_pdb(&self, pdb: Value) -> anyhow::Result<()> {
        let (namespace, name) = key_of(&pdb);
        self.ensure_namespace(&namespace).await?;
        let created = Api::<PodDisruptionBudget>::namespaced(self.client(), &namespace)
            .create(&PostParams::default(), &serde_json::from_value(pdb)?)
            .await
            .with_context(|| format!("creating PodDisruptionBudget {namespace}/{name}"))?;
        self.observer.add_pdb(serde_json::to_value(created)?);
        Ok(())
    }

    pub fn url(&self) -> &str {
        &self.lease.plane.url
    }

    pub fn ca_pem(&self) -> &str {
        &self.lease.plane.ca_pem
    }

    /// Changes a node as another client would: a strategic-merge patch.
    pub async fn patch_node(&self, name: &str, patch: Value) -> anyhow::Result<()> {
        Api::<Node>::all(self.client())
            .patch(name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
            .with_context(|| format!("patching node {name}"))?;
        Ok(())
    }

    pub async fn node(&self, name: &str) -> anyhow::Result<Option<Value>> {
        let node = Api::<Node>::all(self.client()).get_opt(name).await?;
        Ok(node.map(serde_json::to_value).transpose()?)
    }

    /// The pods bound to `node`, in every namespace, ordered by namespace and name.
    pub async fn pods_on(&self, node: &str) -> anyhow::Result<Vec<Value>> {
        let on_node = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let pods = Api::<Pod>::all(self.client()).list(&on_node).await?;
        Ok(pods
            .items
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<_, _>>()?)
    }

    /// The reasons of the events about `node`, oldest first, as `kubectl describe node`
    /// lists them.
    pub async fn event_reasons(&self, node: &str) -> anyhow::Result<Vec<String>> {
        Ok(self
            .events_about(node)
            .await?
            .iter()
            .filter_map(|e| e["reason"].as_str().map(str::to_owned))
            .collect())
    }

    /// The events about `node`, oldest first.
    pub async fn events_about(&self, node: &str) -> anyhow::Result<Vec<Value>> {
        let about = ListParams::default().fields(&format!("involvedObject.name={node}"));
        let mut events = Api::<Event>::all(self.client()).list(&about).await?.items;
        // Creation order: timestamps have one-second resolution, revisions do not tie.
        events.sort_by_key(resource_version);
        Ok(events
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<_, _>>()?)
    }

    /// The fewest healthy (Ready, not terminating) pods the budget's selector had at any
    /// moment since it was added, as the pods' own changes showed it.
    pub fn pdb_min_healthy(&self, namespace: &str, name: &str) -> Option<i64> {
        self.observer
            .min_healthy(&(namespace.to_owned(), name.to_owned()))
    }

    /// The distinct EKS tokens the webhook accepted during this lease. The API server keeps
    /// an accepted token for 10 s (`TokenSuccessCacheTTL`, no flag changes it) and does not
    /// ask again meanwhile: a token another lease used just before is missing here.
    /// Refusals are never cached.
    pub fn tokens_seen(&self) -> Vec<String> {
        self.lease.plane.authn.seen().tokens.clone()
    }

    /// Why the webhook refused tokens during this lease.
    pub fn auth_failures(&self) -> Vec<String> {
        self.lease.plane.authn.seen().failures.clone()
    }

    /// Writes node status as the kubelet does: a merge patch of the status subresource
    /// (`{"status": {...}}`), the only write that changes it.
    pub async fn patch_node_status(&self, name: &str, patch: Value) -> anyhow::Result<()> {
        Api::<Node>::all(self.client())
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("writing node {name}'s status"))?;
        Ok(())
    }

    /// Deletes a pod as `kubectl delete pod` does, with `grace` seconds (the pod's own
    /// when `None`): it stays, terminating, until the kubelet stand-in removes it.
    pub async fn delete_pod(
        &self,
        namespace: &str,
        name: &str,
        grace: Option<i64>,
    ) -> anyhow::Result<()> {
        let params = DeleteParams {
            grace_period_seconds: grace.and_then(|g| u32::try_from(g).ok()),
            ..DeleteParams::default()
        };
        Api::<Pod>::namespaced(self.client(), namespace)
            .delete(name, &params)
            .await
            .with_context(|| format!("deleting pod {namespace}/{name}"))?;
        Ok(())
    }

    /// The pods that began terminating during the lease, in the order the pod watch saw
    /// it, with their `deletionGracePeriodSeconds` (0 for a pod deleted at once).
    pub fn terminations(&self) -> Vec<(Key, Option<i64>)> {
        self.observer.terminations()
    }

    /// Deletes the namespace (it turns Terminating: new objects there, evictions included,
    /// are refused) and, after `lag`, does the namespace controller's part, which does not
    /// run here: deletes its pods gracefully, then finalizes it once they are gone.
    pub async fn terminate_namespace(&self, namespace: &str, lag: Duration) -> anyhow::Result<()> {
        let namespaces: Api<Namespace> = Api::all(self.client());
        namespaces
            .delete(namespace, &DeleteParams::default())
            .await
            .with_context(|| format!("deleting namespace {namespace}"))?;
        lock(&self.lease.plane.namespaces).remove(namespace);
        let pods: Api<Pod> = Api::namespaced(self.client(), namespace);
        let name = namespace.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(lag).await;
            let everything = ListParams::default();
            let _best_effort = pods
                .delete_collection(&DeleteParams::default(), &everything)
                .await;
            while pods
                .list(&everything)
                .await
                .is_ok_and(|l| !l.items.is_empty())
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let finalized = json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name}, "spec": {"finalizers": []},
            });
            let _best_effort = namespaces
                .replace_subresource("finalize", &name, &PostParams::default(), &finalized)
                .await;
        });
        Ok(())
    }

    /// A kubeconfig with the server, its CA and a presigned EKS token for `cluster` from the
    /// test credentials (valid 15 minutes), as `aws eks get-token` gives an operator.
    pub fn kubeconfig(&self, cluster: &str) -> anyhow::Result<Value> {
        crate::eks_kubeconfig(self.url(), self.ca_pem(), cluster)
    }

    /// Deletes the node; its pods stay (no pod garbage collector runs).
    pub async fn delete_node(&self, name: &str) -> anyhow::Result<()> {
        Api::<Node>::all(self.client())
            .delete(name, &DeleteParams::default())
            .await
            .with_context(|| format!("deleting node {name}"))?;
        Ok(())
    }

    /// Changes a budget (a merge patch), as an operator's `kubectl patch pdb` does.
    pub async fn patch_pdb(&self, namespace: &str, name: &str, patch: Value) -> anyhow::Result<()> {
        let written = Api::<PodDisruptionBudget>::namespaced(self.client(), namespace)
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("patching PodDisruptionBudget {namespace}/{name}"))?;
        self.observer.add_pdb(serde_json::to_value(written)?);
        Ok(())
    }
}
