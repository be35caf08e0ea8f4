//! What runs beside the control plane while a lease lives, fed by one watch of every pod: the
//! kubelet and ReplicaSet controller the plane lacks, following the emulator's [`Behaviour`]
//! so that the same tests pass on both backends, and the budget observer.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions, WatchEvent,
    WatchParams,
};
use serde_json::{json, Value};

use crate::kube::state::{is_terminating, key_of, Behaviour, Key, World};

/// How long a seeding call waits for the watch to report its own write.
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The pods as the watch last reported them, and the budgets tests added, with the lowest
/// healthy count each budget's selector saw.
#[derive(Debug, Clone)]
pub(super) struct Observer {
    inner: Arc<Mutex<Observed>>,
    /// The resourceVersion the mirror has caught up with.
    caught_up: Arc<tokio::sync::watch::Sender<u64>>,
}

#[derive(Debug)]
struct Observed {
    /// Only its pods and budgets are used: its selector matching and its definition of a
    /// healthy pod are the emulator's, which the observer must agree with.
    mirror: World,
    min_healthy: HashMap<Key, i64>,
    /// Pods in the order they began terminating (or went at once), with the grace period
    /// they were given; `terminated` holds their uids.
    terminations: Vec<(Key, Option<i64>)>,
    terminated: HashSet<String>,
}

fn resource_version(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0)
}

impl Observer {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(Observed {
                mirror: World::new(Behaviour::default()),
                min_healthy: HashMap::new(),
                terminations: Vec::new(),
                terminated: HashSet::new(),
            })),
            caught_up: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Observed> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits until the watch has reported `resource_version` (an etcd revision, so every
    /// write before it too).
    pub async fn wait_for(&self, resource_version: u64) -> anyhow::Result<()> {
        let mut caught_up = self.caught_up.subscribe();
        tokio::time::timeout(
            OBSERVE_TIMEOUT,
            caught_up.wait_for(|seen| *seen >= resource_version),
        )
        .await
        .context("the pod watch did not report a write in time")?
        .context("the pod watch stopped")?;
        Ok(())
    }

    fn caught_up_with(&self, resource_version: u64) {
        self.caught_up.send_if_modified(|seen| {
            let newer = resource_version > *seen;
            if newer {
                *seen = resource_version;
            }
            newer
        });
    }

    pub fn add_pdb(&self, pdb: Value) {
        let mut observed = self.lock();
        observed.mirror.pdbs.insert(key_of(&pdb), pdb);
        observed.count_healthy();
    }

    pub fn min_healthy(&self, key: &Key) -> Option<i64> {
        self.lock().min_healthy.get(key).copied()
    }

    pub fn terminations(&self) -> Vec<(Key, Option<i64>)> {
        self.lock().terminations.clone()
    }

    fn relist(&self, pods: Vec<Value>, resource_version: u64) {
        let mut observed = self.lock();
        for pod in &pods {
            observed.note_termination(pod, false);
        }
        observed.mirror.pods = pods.into_iter().map(|p| (key_of(&p), p)).collect();
        observed.count_healthy();
        drop(observed);
        self.caught_up_with(resource_version);
    }

    fn changed(&self, pod: &Value, deleted: bool) {
        let mut observed = self.lock();
        observed.note_termination(pod, deleted);
        let key = key_of(pod);
        if deleted {
            let same = observed
                .mirror
                .pods
                .get(&key)
                .map(|p| &p["metadata"]["uid"])
                == Some(&pod["metadata"]["uid"]);
            if same {
                observed.mirror.pods.remove(&key);
            }
        } else {
            observed.mirror.pods.insert(key, pod.clone());
        }
        observed.count_healthy();
        drop(observed);
        self.caught_up_with(resource_version(pod));
    }
}

impl Observed {
    fn note_termination(&mut self, pod: &Value, deleted: bool) {
        let terminating = is_terminating(pod);
        if !terminating && !deleted {
            return;
        }
        let uid = pod["metadata"]["uid"].as_str().unwrap_or_default();
        if !self.terminated.insert(uid.to_owned()) {
            return;
        }
        let grace = if terminating {
            pod["metadata"]["deletionGracePeriodSeconds"].as_i64()
        } else {
            Some(0)
        };
        self.terminations.push((key_of(pod), grace));
    }

    fn count_healthy(&mut self) {
        for (key, pdb) in &self.mirror.pdbs {
            let healthy = self.mirror.pdb_numbers(pdb).0;
            let min = self.min_healthy.entry(key.clone()).or_insert(healthy);
            *min = (*min).min(healthy);
        }
    }
}

/// The kubelet's and the ReplicaSet controller's part, as the emulator's `World` plays it.
struct Kubelet {
    client: kube::Client,
    behaviour: Behaviour,
    /// Pods whose end is already in hand (by uid).
    handled: HashSet<String>,
    replacements: u64,
}

type Work = BoxFuture<'static, ()>;

impl Kubelet {
    /// What to do about a pod's change: a terminating pod goes once its containers stopped;
    /// a ReplicaSet's pod is replaced as soon as it terminates or is gone.
    fn on_change(&mut self, pod: &Value, deleted: bool) -> Vec<Work> {
        let uid = pod["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let mut work = Vec::new();
        if deleted {
            // Deleted without a grace period (grace 0, or an eviction with grace 0).
            if self.handled.insert(uid) {
                work.extend(self.replace(pod));
            }
            return work;
        }
        if !is_terminating(pod) || !self.handled.insert(uid.clone()) {
            return work;
        }
        let stop_delay = self.behaviour.stop_delay(pod);
        let grace = pod["metadata"]["deletionGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(0);
        let after = stop_delay.min(Duration::from_secs(grace).mul_f64(self.behaviour.time_scale));
        let (namespace, name) = key_of(pod);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        work.push(Box::pin(async move {
            tokio::time::sleep(after).await;
            let stopped = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            // Gone already, or replaced by a pod of the same name: nothing to stop.
            let _gone = pods.delete(&name, &stopped).await;
        }));
        work.extend(self.replace(pod));
        work
    }

    fn replace(&mut self, pod: &Value) -> Option<Work> {
        let owner = pod["metadata"]["ownerReferences"]
            .as_array()?
            .iter()
            .find(|o| o["kind"] == "ReplicaSet" && o["controller"] == true)?
            .clone();
        let (namespace, _) = key_of(pod);
        self.replacements += 1;
        let replacement = Replacement {
            client: self.client.clone(),
            name: format!(
                "{}-r{:05}",
                owner["name"].as_str().unwrap_or_default(),
                self.replacements
            ),
            namespace,
            owner,
            spare_node: self.behaviour.spare_node.clone(),
            ready_after: self.behaviour.replacement_ready_delay,
        };
        let work: Work = Box::pin(async move {
            if let Err(error) = replacement.create().await {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "kubelet stand-in: no replacement"
                );
            }
        });
        Some(work)
    }
}

struct Replacement {
    client: kube::Client,
    namespace: String,
    name: String,
    owner: Value,
    spare_node: Option<String>,
    ready_after: Duration,
}

impl Replacement {
    /// A new pod from the ReplicaSet's template: on the spare node and Ready a little later,
    /// or Pending for want of a node.
    async fn create(self) -> anyhow::Result<()> {
        let replicaset = self.owner["name"].as_str().unwrap_or_default();
        let template = Api::<ReplicaSet>::namespaced(self.client.clone(), &self.namespace)
            .get(replicaset)
            .await
            .with_context(|| format!("reading ReplicaSet {replicaset}"))?
            .spec
            .map(|s| s.template)
            .unwrap_or_default();
        let template = serde_json::to_value(template)?;
        let mut pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": template["metadata"]["labels"],
                "ownerReferences": [self.owner],
            },
            "spec": template["spec"],
        });
        if let Some(node) = &self.spare_node {
            pod["spec"]["nodeName"] = json!(node);
        }
        let pods: Api<Pod> = Api::namespaced(self.client, &self.namespace);
        let created = pods
            .create(&PostParams::default(), &serde_json::from_value(pod)?)
            .await
            .with_context(|| format!("creating {}", self.name))?;
        let phase = if self.spare_node.is_some() {
            "Running"
        } else {
            "Pending"
        };
        let not_ready = json!({"status": {
            "phase": phase, "conditions": [{"type": "Ready", "status": "False"}],
        }});
        pods.patch_status(
            &self.name,
            &PatchParams::default(),
            &Patch::Merge(not_ready),
        )
        .await?;
        if self.spare_node.is_none() {
            return Ok(());
        }
        tokio::time::sleep(self.ready_after).await;
        // The uid makes it a precondition: a pod since replaced under the same name stays.
        let ready = json!({
            "metadata": {"uid": created.metadata.uid},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
        });
        pods.patch_status(&self.name, &PatchParams::default(), &Patch::Merge(ready))
            .await?;
        Ok(())
    }
}

/// Awaits `future` while the timers in `pending` keep running.
async fn meanwhile<T>(pending: &mut FuturesUnordered<Work>, future: impl Future<Output = T>) -> T {
    tokio::pin!(future);
    loop {
        tokio::select! {
            out = &mut future => return out,
            Some(()) = pending.next(), if !pending.is_empty() => {}
        }
    }
}

/// Watches every pod until aborted (when the lease ends), keeping `observer` current and
/// playing the kubelet and the ReplicaSet controller.
pub(super) async fn run(client: kube::Client, behaviour: Behaviour, observer: Observer) {
    let pods: Api<Pod> = Api::all(client.clone());
    let mut kubelet = Kubelet {
        client,
        behaviour,
        handled: HashSet::new(),
        replacements: 0,
    };
    let mut pending: FuturesUnordered<Work> = FuturesUnordered::new();
    let mut resume: Option<String> = None;
    loop {
        let version = match resume.take() {
            Some(version) => version,
            None => match meanwhile(&mut pending, pods.list(&ListParams::default())).await {
                Ok(list) => {
                    let version = list.metadata.resource_version.unwrap_or_default();
                    let items: Vec<Value> = list
                        .items
                        .iter()
                        .filter_map(|p| serde_json::to_value(p).ok())
                        .collect();
                    for pod in &items {
                        pending.extend(kubelet.on_change(pod, false));
                    }
                    observer.relist(items, version.parse().unwrap_or(0));
                    version
                }
                Err(error) => {
                    tracing::warn!(%error, "kubelet stand-in: listing pods");
                    meanwhile(&mut pending, tokio::time::sleep(Duration::from_millis(200))).await;
                    continue;
                }
            },
        };
        let watch = WatchParams::default().timeout(290);
        let stream = match meanwhile(&mut pending, pods.watch(&watch, &version)).await {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "kubelet stand-in: watching pods");
                meanwhile(&mut pending, tokio::time::sleep(Duration::from_millis(200))).await;
                continue;
            }
        };
        let mut stream = std::pin::pin!(stream);
        let mut last = version;
        while let Some(Ok(event)) = meanwhile(&mut pending, stream.next()).await {
            let (pod, deleted) = match event {
                WatchEvent::Added(pod) | WatchEvent::Modified(pod) => (pod, false),
                WatchEvent::Deleted(pod) => (pod, true),
                WatchEvent::Bookmark(bookmark) => {
                    last = bookmark.metadata.resource_version;
                    continue;
                }
                // 410 Gone and the like: list afresh.
                WatchEvent::Error(_) => {
                    last = String::new();
                    break;
                }
            };
            let Ok(pod) = serde_json::to_value(&pod) else {
                continue;
            };
            observer.changed(&pod, deleted);
            pending.extend(kubelet.on_change(&pod, deleted));
            last = pod["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
        }
        resume = Some(last).filter(|v| !v.is_empty());
    }
}
