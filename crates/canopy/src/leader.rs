//! Leader election with a `coordination.k8s.io/v1` Lease, as client-go's leaderelection
//! (seed §1): replicas of a component race for one Lease; the holder renews it every retry
//! period and runs the component; a holder that cannot renew within the renew deadline stops
//! the component and competes again; the others take over once the lease has not been
//! renewed for its duration. A holder that shuts down cleanly releases the lease so that the
//! next one takes over at once.

use std::{future::Future, time::Duration};

use anyhow::Result;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

/// upstream's `--leader-elect-*` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct LeaderElectionArgs {
    /// Elect one leader among replicas before running (`false`: always run).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// How long a lease that is not renewed keeps others waiting. Seconds, or 15s, 1m...
    #[arg(long, default_value = "15s", value_parser = crate::server::parse_duration)]
    pub leader_elect_lease_duration: Duration,
    /// How long the leader keeps trying to renew before it gives up leadership.
    #[arg(long, default_value = "10s", value_parser = crate::server::parse_duration)]
    pub leader_elect_renew_deadline: Duration,
    /// How often to try to acquire or renew the lease.
    #[arg(long, default_value = "2s", value_parser = crate::server::parse_duration)]
    pub leader_elect_retry_period: Duration,
}

/// This process's name in leases: host name, process id and a random suffix, so that a
/// restarted process is a new holder.
pub fn identity() -> String {
    static IDENTITY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    IDENTITY.get_or_init(new_identity).clone()
}

fn new_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "canopy".into());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}_{}_{}", std::process::id(), &suffix[..8])
}

struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    args: LeaderElectionArgs,
}

fn millis(t: &Option<MicroTime>) -> i64 {
    t.as_ref().map_or(0, |t| t.0.as_millisecond())
}

impl Elector {
    /// One attempt to take or keep the lease; `Ok(true)` when held.
    async fn try_acquire_or_renew(&self) -> Result<bool> {
        let now = MicroTime(Timestamp::now());
        let duration = self.args.leader_elect_lease_duration.as_secs().max(1) as i32;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if holder != self.identity {
            let held_for = i64::from(spec.lease_duration_seconds.unwrap_or(duration)) * 1000;
            let expired = millis(&spec.renew_time) + held_for < now.0.as_millisecond();
            if !holder.is_empty() && !expired {
                return Ok(false);
            }
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_duration_seconds = Some(duration);
        spec.renew_time = Some(now);
        // The resourceVersion makes this a compare-and-swap: of two takers, one wins.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Gives the lease up (on shutdown) if still held.
    async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        let _ = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await;
    }
}

/// Runs `component` while this process holds the Lease `kube-system/<name>`, until
/// `shutdown` resolves; with election off, simply runs it.
pub async fn run_elected<F, Fut>(
    client: Client,
    name: &str,
    args: LeaderElectionArgs,
    shutdown: impl Future<Output = ()>,
    component: F,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut shutdown = std::pin::pin!(shutdown);
    if !args.leader_elect {
        tokio::select! {
            _ = component() => {}
            _ = &mut shutdown => {}
        }
        return;
    }
    let elector = Elector {
        api: Api::namespaced(client, "kube-system"),
        name: name.to_string(),
        identity: identity(),
        args: args.clone(),
    };
    let retry = args
        .leader_elect_retry_period
        .max(Duration::from_millis(100));
    loop {
        // Follower: try until the lease is ours.
        loop {
            match elector.try_acquire_or_renew().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(err) => tracing::debug!(lease = %name, error = %err, "lease unavailable"),
            }
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = &mut shutdown => return,
            }
        }
        tracing::info!(lease = %name, identity = %elector.identity, "became leader");
        let task = tokio::spawn(component());
        // Leader: renew; give up when renewals fail for longer than the renew deadline.
        let mut last_renewal = tokio::time::Instant::now();
        let lost = loop {
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = &mut shutdown => break false,
            }
            match elector.try_acquire_or_renew().await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => break true,
                Err(err) => {
                    tracing::warn!(lease = %name, error = %err, "could not renew the lease");
                    if last_renewal.elapsed() > args.leader_elect_renew_deadline {
                        break true;
                    }
                }
            }
        };
        task.abort();
        if !lost {
            elector.release().await;
            return;
        }
        tracing::warn!(lease = %name, "lost leadership; stopped, competing again");
    }
}
