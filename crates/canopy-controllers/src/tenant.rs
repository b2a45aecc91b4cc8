//! Tenant status: each Tenant's namespaces and usage (pods, their cpu and memory requests,
//! VMs), kept current from watches (seed §2).
//!
//! Three watches (namespaces, pods and nodes that carry the tenant label) feed one index
//! that tallies every object under its tenant, so an event costs a map update and the status
//! of a tenant is computed from that tenant's objects only, never by scanning the cluster.
//! Changed tenants are batched and their status written through the status subresource.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use canopy_api::tenant::{TENANT_LABEL, Tenant, Usage, pod_counts, pod_usage};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt, reflector, watcher},
};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// How long changes are gathered before statuses are written: a burst of pod events costs
/// one write per tenant.
const BATCH: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Kind {
    Namespace,
    Pod,
    Node,
}

/// What one object contributes to its tenant.
#[derive(Clone)]
struct Entry {
    tenant: String,
    usage: Usage,
}

#[derive(Default)]
struct Tally {
    namespaces: BTreeSet<String>,
    nodes: usize,
    pods: HashMap<String, Usage>,
}

#[derive(Default)]
struct Index {
    objects: HashMap<(Kind, String), Entry>,
    tenants: HashMap<String, Tally>,
}

impl Index {
    fn remove(&mut self, kind: Kind, key: &str) -> Option<String> {
        let entry = self.objects.remove(&(kind, key.to_string()))?;
        if let Some(tally) = self.tenants.get_mut(&entry.tenant) {
            match kind {
                Kind::Namespace => {
                    tally.namespaces.remove(key);
                }
                Kind::Node => tally.nodes = tally.nodes.saturating_sub(1),
                Kind::Pod => {
                    tally.pods.remove(key);
                }
            }
            if tally.namespaces.is_empty() && tally.nodes == 0 && tally.pods.is_empty() {
                self.tenants.remove(&entry.tenant);
            }
        }
        Some(entry.tenant)
    }

    /// Records an object (or forgets it, for `None`); returns the tenants it changed.
    fn set(&mut self, kind: Kind, key: &str, entry: Option<Entry>) -> Vec<String> {
        let mut touched: Vec<String> = self.remove(kind, key).into_iter().collect();
        if let Some(entry) = entry {
            let tally = self.tenants.entry(entry.tenant.clone()).or_default();
            match kind {
                Kind::Namespace => {
                    tally.namespaces.insert(key.to_string());
                }
                Kind::Node => tally.nodes += 1,
                Kind::Pod => {
                    tally.pods.insert(key.to_string(), entry.usage);
                }
            }
            if !touched.contains(&entry.tenant) {
                touched.push(entry.tenant.clone());
            }
            self.objects.insert((kind, key.to_string()), entry);
        }
        touched
    }

    /// Replaces every object of a kind (after a relist); returns the tenants it changed.
    fn replace(&mut self, kind: Kind, fresh: HashMap<String, Entry>) -> HashSet<String> {
        let stale: Vec<String> = self
            .objects
            .keys()
            .filter(|(k, key)| *k == kind && !fresh.contains_key(key))
            .map(|(_, key)| key.clone())
            .collect();
        let mut touched = HashSet::new();
        for key in stale {
            touched.extend(self.set(kind, &key, None));
        }
        for (key, entry) in fresh {
            touched.extend(self.set(kind, &key, Some(entry)));
        }
        touched
    }

    fn status(&self, tenant: &str) -> Value {
        let empty = Tally::default();
        let tally = self.tenants.get(tenant).unwrap_or(&empty);
        let mut total = Usage::default();
        for usage in tally.pods.values() {
            total += *usage;
        }
        json!({
            "namespaces": tally.namespaces,
            "usage": {
                "cpu": format_cpu(total.cpu_milli),
                "memory": format_memory(total.memory_bytes),
                "pods": total.pods,
                "vms": tally.nodes,
            }
        })
    }
}

fn format_cpu(milli: i128) -> String {
    if milli % 1000 == 0 {
        (milli / 1000).to_string()
    } else {
        format!("{milli}m")
    }
}

fn format_memory(bytes: i128) -> String {
    const UNITS: [(&str, i128); 4] = [
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    UNITS
        .iter()
        .find(|(_, size)| bytes != 0 && bytes % size == 0)
        .map(|(unit, size)| format!("{}{unit}", bytes / size))
        .unwrap_or_else(|| bytes.to_string())
}

fn object_key<K: Resource>(obj: &K) -> String {
    match obj.meta().namespace.as_deref() {
        Some(ns) => format!("{ns}/{}", obj.name_any()),
        None => obj.name_any(),
    }
}

fn tenant_of<K: Resource>(obj: &K) -> Option<String> {
    obj.labels().get(TENANT_LABEL).cloned()
}

/// Follows one kind into the index, sending the tenants each event changes.
async fn follow<K, S>(
    kind: Kind,
    stream: S,
    entry: fn(&K) -> Option<Entry>,
    index: Arc<Mutex<Index>>,
    changed: mpsc::UnboundedSender<String>,
) where
    K: Resource + Clone + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let mut relisting: Option<HashMap<String, Entry>> = None;
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        let touched: Vec<String> = match event {
            Ok(watcher::Event::Apply(obj)) => {
                index.lock().set(kind, &object_key(&obj), entry(&obj))
            }
            Ok(watcher::Event::Delete(obj)) => index.lock().set(kind, &object_key(&obj), None),
            Ok(watcher::Event::Init) => {
                relisting = Some(HashMap::new());
                continue;
            }
            Ok(watcher::Event::InitApply(obj)) => {
                if let (Some(fresh), Some(e)) = (relisting.as_mut(), entry(&obj)) {
                    fresh.insert(object_key(&obj), e);
                }
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                let fresh = relisting.take().unwrap_or_default();
                index.lock().replace(kind, fresh).into_iter().collect()
            }
            Err(err) => {
                tracing::debug!(?kind, error = %err, "tenant status watch failed; retrying");
                continue;
            }
        };
        for tenant in touched {
            if changed.send(tenant).is_err() {
                return;
            }
        }
    }
}

fn namespace_entry(ns: &Namespace) -> Option<Entry> {
    Some(Entry {
        tenant: tenant_of(ns)?,
        usage: Usage::default(),
    })
}

fn node_entry(node: &Node) -> Option<Entry> {
    Some(Entry {
        tenant: tenant_of(node)?,
        usage: Usage::default(),
    })
}

fn pod_entry(pod: &Pod) -> Option<Entry> {
    let tenant = tenant_of(pod)?;
    let value = serde_json::to_value(pod).ok()?;
    let usage = if pod_counts(&value) {
        pod_usage(&value)
    } else {
        Usage::default()
    };
    Some(Entry { tenant, usage })
}

/// Runs the controller until its watches end.
pub async fn run(client: Client) {
    let index = Arc::new(Mutex::new(Index::default()));
    let (changed, mut queue) = mpsc::unbounded_channel::<String>();
    let labelled = || watcher::Config::default().labels(TENANT_LABEL);

    let (tenants, writer) = reflector::store::<Tenant>();
    let tenant_events = {
        let changed = changed.clone();
        reflector::reflector(
            writer,
            watcher(
                Api::<Tenant>::all(client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .applied_objects()
        .for_each(move |tenant| {
            if let Ok(tenant) = tenant {
                let _ = changed.send(tenant.name_any());
            }
            futures::future::ready(())
        })
    };
    let namespaces = follow(
        Kind::Namespace,
        watcher(Api::<Namespace>::all(client.clone()), labelled()).default_backoff(),
        namespace_entry,
        index.clone(),
        changed.clone(),
    );
    let pods = follow(
        Kind::Pod,
        watcher(Api::<Pod>::all(client.clone()), labelled()).default_backoff(),
        pod_entry,
        index.clone(),
        changed.clone(),
    );
    let nodes = follow(
        Kind::Node,
        watcher(Api::<Node>::all(client.clone()), labelled()).default_backoff(),
        node_entry,
        index.clone(),
        changed,
    );
    let api: Api<Tenant> = Api::all(client);
    let writer = async move {
        let mut pending: HashSet<String> = HashSet::new();
        while let Some(first) = queue.recv().await {
            pending.insert(first);
            tokio::time::sleep(BATCH).await;
            while let Ok(more) = queue.try_recv() {
                pending.insert(more);
            }
            for name in pending.drain() {
                let Some(tenant) = tenants.get(&reflector::ObjectRef::new(&name)) else {
                    continue;
                };
                let status = index.lock().status(&name);
                let current = serde_json::to_value(&tenant.status).unwrap_or(Value::Null);
                if same_status(&current, &status) {
                    continue;
                }
                let patch = json!({ "status": status });
                if let Err(err) = api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    tracing::warn!(tenant = %name, error = %err, "could not write a tenant's status");
                }
            }
        }
    };
    tokio::join!(tenant_events, namespaces, pods, nodes, writer);
}

/// Whether the stored status already says what `wanted` says (empty lists and absent fields
/// are the same).
fn same_status(current: &Value, wanted: &Value) -> bool {
    let namespaces = |v: &Value| v.get("namespaces").cloned().unwrap_or_else(|| json!([]));
    let usage = |v: &Value| v.get("usage").cloned().unwrap_or(Value::Null);
    namespaces(current) == namespaces(wanted) && usage(current) == usage(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tenant: &str, cpu_milli: i128, memory_bytes: i128) -> Entry {
        Entry {
            tenant: tenant.into(),
            usage: Usage {
                cpu_milli,
                memory_bytes,
                pods: 1,
            },
        }
    }

    #[test]
    fn tallies_follow_objects_between_tenants() {
        let mut index = Index::default();
        index.set(Kind::Namespace, "a1", Some(entry("a", 0, 0)));
        index.set(Kind::Pod, "a1/p", Some(entry("a", 250, 64 << 20)));
        index.set(Kind::Pod, "a1/q", Some(entry("a", 1750, 64 << 20)));
        let status = index.status("a");
        assert_eq!(status["namespaces"], json!(["a1"]));
        assert_eq!(status["usage"]["cpu"], "2");
        assert_eq!(status["usage"]["memory"], "128Mi");
        assert_eq!(status["usage"]["pods"], 2);
        // An object whose tenant label changes moves; both tenants are touched.
        let touched = index.set(Kind::Pod, "a1/q", Some(entry("b", 100, 1000)));
        assert_eq!(touched, ["a", "b"]);
        assert_eq!(index.status("a")["usage"]["cpu"], "250m");
        assert_eq!(index.status("b")["usage"]["memory"], "1000");
        // A relist drops what is gone.
        let touched = index.replace(Kind::Pod, HashMap::new());
        assert_eq!(touched, HashSet::from(["a".to_string(), "b".to_string()]));
        assert_eq!(index.status("a")["usage"]["pods"], 0);
        assert_eq!(index.status("b")["namespaces"], json!([]));
        index.set(Kind::Node, "n1", Some(entry("a", 0, 0)));
        assert_eq!(index.status("a")["usage"]["vms"], 1);
    }

    #[test]
    fn statuses_compare_like_the_server_stores_them() {
        let wanted =
            json!({"namespaces": [], "usage": {"cpu": "0", "memory": "0", "pods": 0, "vms": 0}});
        let stored = json!({"usage": {"cpu": "0", "memory": "0", "pods": 0, "vms": 0}});
        assert!(same_status(&stored, &wanted));
        assert!(!same_status(&Value::Null, &wanted));
    }
}
