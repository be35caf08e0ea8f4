//! Waiting for evicted pods to be gone: one WATCH of the node's pods from the drain's own
//! LIST (so every deletion since is replayed), whatever the number of pods; a fresh LIST only
//! when a watch ends or the server no longer holds that far back. A pod is gone when it is
//! deleted or when a new pod (another UID) holds its name.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{WatchEvent, WatchParams};
use kube::{Api, Client};
use tracing::debug;

use super::{list_node_pods, pod_ref, DrainError, PodRef};

/// The longest single watch request; kube requires less than 295 s, and a fresh LIST after
/// each keeps the picture exact even if an event was missed.
const MAX_WATCH: Duration = Duration::from_secs(60);

type Key = (String, String);

/// Returns (gone, still there at `give_up_at`).
pub(super) async fn wait_until_gone(
    client: &Client,
    node: &str,
    waiting: Vec<PodRef>,
    listed_at: String,
    give_up_at: chrono::DateTime<Utc>,
    retry_pause: Duration,
) -> Result<(Vec<PodRef>, Vec<PodRef>), DrainError> {
    let mut waiting: HashMap<Key, PodRef> = waiting
        .into_iter()
        .map(|p| ((p.namespace.clone(), p.name.clone()), p))
        .collect();
    let mut gone = Vec::new();
    let pods: Api<Pod> = Api::all(client.clone());
    let mut watch_from = Some(listed_at).filter(|rv| !rv.is_empty());
    loop {
        let time_left = give_up_at > Utc::now();
        let resource_version = match watch_from.take() {
            Some(rv) if time_left => rv,
            // With the deadline past before the first watch (evictions that took it all), one
            // LIST still tells which evicted pods are gone: they are not "left".
            _ => list_and_prune(client, node, &mut waiting, &mut gone).await?,
        };
        let left = (give_up_at - Utc::now()).to_std().unwrap_or_default();
        if waiting.is_empty() || left.is_zero() {
            break;
        }
        let seconds = u32::try_from(left.min(MAX_WATCH).as_secs().max(1)).unwrap_or(1);
        let params = WatchParams::default()
            .fields(&format!("spec.nodeName={node}"))
            .timeout(seconds);
        let stream = match pods.watch(&params, &resource_version).await {
            Ok(stream) => stream,
            Err(error) => {
                debug!(%error, "watch failed; listing again");
                tokio::time::sleep(retry_pause).await;
                continue;
            }
        };
        let mut stream = std::pin::pin!(stream);
        while let Ok(Some(event)) = stream.try_next().await {
            let (pod, deleted) = match event {
                WatchEvent::Deleted(pod) => (pod, true),
                WatchEvent::Added(pod) | WatchEvent::Modified(pod) => (pod, false),
                // 410 Gone and the like: list again.
                WatchEvent::Error(_) => break,
                WatchEvent::Bookmark(_) => continue,
            };
            let id = pod_ref(&pod);
            let key = (id.namespace.clone(), id.name.clone());
            let replaced = waiting.get(&key).is_some_and(|w| w.uid != id.uid);
            let removed = waiting.get(&key).is_some_and(|w| w.uid == id.uid) && deleted;
            if replaced || removed {
                if let Some(done) = waiting.remove(&key) {
                    gone.push(done);
                }
            }
            if waiting.is_empty() {
                break;
            }
        }
        if waiting.is_empty() {
            break;
        }
    }
    Ok((gone, waiting.into_values().collect()))
}

/// Lists the node's pods, moves the waited-for ones that are gone to `gone`, and returns the
/// list's resourceVersion to watch from.
async fn list_and_prune(
    client: &Client,
    node: &str,
    waiting: &mut HashMap<Key, PodRef>,
    gone: &mut Vec<PodRef>,
) -> Result<String, DrainError> {
    let (present, resource_version) = list_node_pods(client, node).await?;
    let present: HashMap<Key, String> = present
        .iter()
        .map(|p| {
            let id = pod_ref(p);
            ((id.namespace, id.name), id.uid)
        })
        .collect();
    waiting.retain(|key, id| {
        let still = present.get(key) == Some(&id.uid);
        if !still {
            gone.push(id.clone());
        }
        still
    });
    Ok(resource_version)
}
