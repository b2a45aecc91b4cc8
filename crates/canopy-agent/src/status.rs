//! A pod's status from what the runtime reports: pure functions, as upstream's kubelet
//! `generateAPIPodStatus` and `getPhase`, so that they are tested without containers.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        ContainerState as ApiState, ContainerStateRunning, ContainerStateTerminated,
        ContainerStateWaiting, ContainerStatus as ApiStatus, Pod, PodCondition, PodStatus,
    },
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};

/// What the agent knows of one container of a pod: its latest run, the run before, and why
/// it is not running when it waits.
#[derive(Clone, Debug, Default)]
pub struct ContainerView {
    pub name: String,
    pub image: String,
    pub image_id: String,
    /// The latest run, if any.
    pub current: Option<Run>,
    /// The run before the latest (upstream's lastState).
    pub previous: Option<Run>,
    /// Why the container does not run (ContainerCreating, CrashLoopBackOff, ErrImagePull...).
    pub waiting: Option<(String, String)>,
    /// Whether the container is considered ready (its readiness probe passed, if any).
    pub ready: bool,
    /// Whether the container has started (its startup probe passed, if any).
    pub started: bool,
}

/// One run of a container.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    pub container_id: String,
    pub attempt: u32,
    pub state: RunState,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RunState {
    Running {
        started_at: Timestamp,
    },
    Exited {
        exit_code: i32,
        signal: Option<i32>,
        reason: String,
        message: Option<String>,
        started_at: Option<Timestamp>,
        finished_at: Timestamp,
    },
}

impl Run {
    pub fn running(&self) -> bool {
        matches!(self.state, RunState::Running { .. })
    }

    pub fn exit_code(&self) -> Option<i32> {
        match self.state {
            RunState::Exited { exit_code, .. } => Some(exit_code),
            RunState::Running { .. } => None,
        }
    }
}

/// Upstream's reason for an exit: OOMKilled, Completed or Error.
pub fn exit_reason(exit_code: i32, oom_killed: bool) -> &'static str {
    if oom_killed {
        "OOMKilled"
    } else if exit_code == 0 {
        "Completed"
    } else {
        "Error"
    }
}

fn time(t: Timestamp) -> Time {
    Time(t)
}

fn api_state(run: &Run) -> ApiState {
    match &run.state {
        RunState::Running { started_at } => ApiState {
            running: Some(ContainerStateRunning {
                started_at: Some(time(*started_at)),
            }),
            ..Default::default()
        },
        RunState::Exited {
            exit_code,
            signal,
            reason,
            message,
            started_at,
            finished_at,
        } => ApiState {
            terminated: Some(ContainerStateTerminated {
                container_id: Some(run.container_id.clone()),
                exit_code: *exit_code,
                signal: *signal,
                reason: Some(reason.clone()),
                message: message.clone(),
                started_at: started_at.map(time),
                finished_at: Some(time(*finished_at)),
            }),
            ..Default::default()
        },
    }
}

impl ContainerView {
    /// The container's API status.
    pub fn api_status(&self) -> ApiStatus {
        let state = match (&self.waiting, &self.current) {
            (Some((reason, message)), _) => ApiState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.clone()),
                    message: (!message.is_empty()).then(|| message.clone()),
                }),
                ..Default::default()
            },
            (None, Some(run)) => api_state(run),
            (None, None) => ApiState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("ContainerCreating".into()),
                    message: None,
                }),
                ..Default::default()
            },
        };
        // While a container waits to be restarted, its last run is its lastState; while it
        // runs again, the run before is.
        let last = if self.waiting.is_some() {
            self.current.as_ref()
        } else {
            self.previous.as_ref()
        };
        let running = self.waiting.is_none() && self.current.as_ref().is_some_and(Run::running);
        ApiStatus {
            name: self.name.clone(),
            image: self.image.clone(),
            image_id: self.image_id.clone(),
            container_id: self.current.as_ref().map(|r| r.container_id.clone()),
            ready: self.ready && self.started && running,
            started: Some(running && self.started),
            restart_count: self.current.as_ref().map_or(0, |r| r.attempt as i32),
            state: Some(state),
            last_state: Some(last.map(api_state).unwrap_or_default()),
            ..Default::default()
        }
    }

    fn succeeded(&self) -> bool {
        self.waiting.is_none() && self.current.as_ref().and_then(Run::exit_code) == Some(0)
    }
}

/// Upstream's `getPhase`: from the init containers and the containers' states.
pub fn phase(restart_policy: &str, init: &[ContainerView], containers: &[ContainerView]) -> String {
    let init_done = init.iter().all(ContainerView::succeeded);
    if !init_done {
        let failed = init.iter().any(|c| {
            c.current
                .as_ref()
                .and_then(Run::exit_code)
                .is_some_and(|code| code != 0)
        });
        return if failed && restart_policy == "Never" {
            "Failed"
        } else {
            "Pending"
        }
        .into();
    }
    let (mut running, mut waiting, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for c in containers {
        match (&c.waiting, &c.current) {
            (None, Some(run)) if run.running() => running += 1,
            (None, Some(run)) => {
                stopped += 1;
                if run.exit_code() == Some(0) {
                    succeeded += 1;
                }
            }
            // Waiting to restart after a run counts as stopped, as upstream.
            (Some(_), Some(run)) if !run.running() => stopped += 1,
            _ => waiting += 1,
        }
    }
    let phase = if waiting > 0 {
        "Pending"
    } else if running > 0 {
        "Running"
    } else if stopped > 0 {
        if restart_policy == "Always" {
            "Running"
        } else if stopped == succeeded {
            "Succeeded"
        } else if restart_policy == "Never" {
            "Failed"
        } else {
            "Running"
        }
    } else {
        "Pending"
    };
    phase.into()
}

/// The pod's status: phase, conditions, container statuses and addresses. Conditions the
/// agent does not own (PodScheduled, readiness gates) are kept from `pod`.
pub fn pod_status(
    pod: &Pod,
    host_ip: Option<&str>,
    pod_ip: Option<&str>,
    sandbox_ready: bool,
    init: &[ContainerView],
    containers: &[ContainerView],
    start_time: Timestamp,
) -> PodStatus {
    let spec = pod.spec.as_ref();
    let restart_policy = spec
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always");
    let phase = phase(restart_policy, init, containers);
    let previous = pod.status.as_ref();
    let now = Timestamp::now();
    let initialized = init.iter().all(ContainerView::succeeded);
    let containers_ready =
        !containers.is_empty() && containers.iter().all(|c| c.api_status().ready);
    let terminal = phase == "Succeeded" || phase == "Failed";
    let mut owned: BTreeMap<&str, (bool, Option<&str>)> = BTreeMap::new();
    owned.insert(
        "PodReadyToStartContainers",
        (sandbox_ready && !terminal, None),
    );
    owned.insert(
        "Initialized",
        (
            initialized || terminal,
            (!initialized && !terminal).then_some("ContainersNotInitialized"),
        ),
    );
    let not_ready = if terminal {
        Some("PodCompleted")
    } else {
        (!containers_ready).then_some("ContainersNotReady")
    };
    owned.insert(
        "ContainersReady",
        (containers_ready && !terminal, not_ready),
    );
    owned.insert("Ready", (containers_ready && !terminal, not_ready));
    let mut conditions: Vec<PodCondition> = previous
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|c| !owned.contains_key(c.type_.as_str()))
        .collect();
    for (kind, (status, reason)) in owned {
        let status_text = if status { "True" } else { "False" };
        let before = previous
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == kind));
        let transition = before
            .filter(|c| c.status == status_text)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or(Time(now));
        let message = match (kind, reason) {
            (_, Some("ContainersNotReady")) => Some(format!(
                "containers with unready status: [{}]",
                containers
                    .iter()
                    .filter(|c| !c.api_status().ready)
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            )),
            (_, Some("ContainersNotInitialized")) => Some(format!(
                "containers with incomplete status: [{}]",
                init.iter()
                    .filter(|c| !c.succeeded())
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            )),
            _ => None,
        };
        conditions.push(PodCondition {
            type_: kind.to_string(),
            status: status_text.to_string(),
            reason: reason.map(str::to_string),
            message,
            last_transition_time: Some(transition),
            ..Default::default()
        });
    }
    conditions.sort_by_key(|c| condition_order(&c.type_));
    let ips = |ip: Option<&str>| {
        ip.map(|ip| vec![k8s_openapi::api::core::v1::HostIP { ip: ip.to_string() }])
    };
    PodStatus {
        phase: Some(phase),
        conditions: Some(conditions),
        host_ip: host_ip.map(str::to_string),
        host_ips: ips(host_ip),
        pod_ip: pod_ip.map(str::to_string),
        pod_ips: pod_ip.map(|ip| vec![k8s_openapi::api::core::v1::PodIP { ip: ip.to_string() }]),
        start_time: Some(
            previous
                .and_then(|s| s.start_time.clone())
                .unwrap_or(Time(start_time)),
        ),
        init_container_statuses: (!init.is_empty())
            .then(|| init.iter().map(ContainerView::api_status).collect()),
        container_statuses: Some(containers.iter().map(ContainerView::api_status).collect()),
        qos_class: Some(qos_class(pod)),
        ..Default::default()
    }
}

/// The order upstream lists a pod's conditions in.
fn condition_order(kind: &str) -> u8 {
    match kind {
        "PodReadyToStartContainers" => 0,
        "Initialized" => 1,
        "Ready" => 2,
        "ContainersReady" => 3,
        "PodScheduled" => 4,
        _ => 5,
    }
}

/// Upstream's QoS class: Guaranteed when every container's requests equal its limits for
/// cpu and memory, BestEffort when nothing is requested or limited, else Burstable.
pub fn qos_class(pod: &Pod) -> String {
    let containers = pod.spec.iter().flat_map(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
    });
    let mut any = false;
    let mut guaranteed = true;
    for c in containers {
        let resources = c.resources.as_ref();
        let requests = resources.and_then(|r| r.requests.as_ref());
        let limits = resources.and_then(|r| r.limits.as_ref());
        for name in ["cpu", "memory"] {
            let request = requests.and_then(|r| r.get(name));
            let limit = limits.and_then(|l| l.get(name));
            if request.is_some() || limit.is_some() {
                any = true;
            }
            match (request, limit) {
                (_, None) => guaranteed = false,
                (Some(r), Some(l)) if r != l => guaranteed = false,
                _ => {}
            }
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(attempt: u32) -> Run {
        Run {
            container_id: format!("canopy://c{attempt}"),
            attempt,
            state: RunState::Running {
                started_at: Timestamp::now(),
            },
        }
    }

    fn exited(attempt: u32, code: i32) -> Run {
        Run {
            container_id: format!("canopy://c{attempt}"),
            attempt,
            state: RunState::Exited {
                exit_code: code,
                signal: None,
                reason: exit_reason(code, false).into(),
                message: None,
                started_at: Some(Timestamp::now()),
                finished_at: Timestamp::now(),
            },
        }
    }

    fn view(current: Option<Run>, waiting: Option<&str>) -> ContainerView {
        ContainerView {
            name: "c".into(),
            current,
            waiting: waiting.map(|w| (w.to_string(), String::new())),
            ready: true,
            started: true,
            ..Default::default()
        }
    }

    #[test]
    fn phases_follow_upstream() {
        let none: &[ContainerView] = &[];
        assert_eq!(phase("Always", none, &[view(None, None)]), "Pending");
        assert_eq!(
            phase("Always", none, &[view(Some(running(0)), None)]),
            "Running"
        );
        assert_eq!(
            phase("Never", none, &[view(Some(exited(0, 0)), None)]),
            "Succeeded"
        );
        assert_eq!(
            phase("Never", none, &[view(Some(exited(0, 1)), None)]),
            "Failed"
        );
        assert_eq!(
            phase("OnFailure", none, &[view(Some(exited(0, 0)), None)]),
            "Succeeded"
        );
        assert_eq!(
            phase("Always", none, &[view(Some(exited(0, 0)), None)]),
            "Running"
        );
        // Crash looping counts as stopped: the pod stays Running.
        let looping = view(Some(exited(3, 1)), Some("CrashLoopBackOff"));
        assert_eq!(phase("Always", none, &[looping]), "Running");
        // Init containers gate the phase.
        let init_running = [view(Some(running(0)), None)];
        assert_eq!(
            phase("Always", &init_running, &[view(None, None)]),
            "Pending"
        );
        let init_failed = [view(Some(exited(0, 2)), None)];
        assert_eq!(phase("Never", &init_failed, &[view(None, None)]), "Failed");
        assert_eq!(
            phase("Always", &init_failed, &[view(None, None)]),
            "Pending"
        );
    }

    #[test]
    fn crash_loop_status_shows_waiting_and_last_state() {
        let looping = view(Some(exited(3, 1)), Some("CrashLoopBackOff"));
        let s = looping.api_status();
        assert_eq!(s.restart_count, 3);
        assert!(!s.ready);
        let state = s.state.unwrap();
        assert_eq!(
            state.waiting.unwrap().reason.as_deref(),
            Some("CrashLoopBackOff")
        );
        let last = s.last_state.unwrap().terminated.unwrap();
        assert_eq!(last.exit_code, 1);
        assert_eq!(last.reason.as_deref(), Some("Error"));
    }

    #[test]
    fn exit_reasons() {
        assert_eq!(exit_reason(0, false), "Completed");
        assert_eq!(exit_reason(137, true), "OOMKilled");
        assert_eq!(exit_reason(2, false), "Error");
    }

    #[test]
    fn pod_status_keeps_scheduler_condition_and_start_time() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "busybox",
                "resources": {"requests": {"cpu": "100m"}, "limits": {"cpu": "100m"}}}]},
            "status": {"conditions": [{"type": "PodScheduled", "status": "True"}],
                       "startTime": "2026-01-01T00:00:00Z"}
        }))
        .unwrap();
        let status = pod_status(
            &pod,
            Some("10.0.0.5"),
            None,
            true,
            &[],
            &[view(Some(running(0)), None)],
            Timestamp::now(),
        );
        assert_eq!(status.phase.as_deref(), Some("Running"));
        let kinds: Vec<_> = status
            .conditions
            .iter()
            .flatten()
            .map(|c| (c.type_.as_str(), c.status.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("PodReadyToStartContainers", "True"),
                ("Initialized", "True"),
                ("Ready", "True"),
                ("ContainersReady", "True"),
                ("PodScheduled", "True")
            ]
        );
        assert_eq!(
            status.start_time.unwrap().0.to_string(),
            "2026-01-01T00:00:00Z"
        );
        assert_eq!(status.host_ip.as_deref(), Some("10.0.0.5"));
        // cpu only, equal request and limit, no memory: Burstable.
        assert_eq!(status.qos_class.as_deref(), Some("Burstable"));
    }

    #[test]
    fn qos_classes() {
        let pod = |resources: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({
                "spec": {"containers": [{"name": "c", "resources": resources}]}
            }))
            .unwrap()
        };
        assert_eq!(qos_class(&pod(serde_json::json!({}))), "BestEffort");
        let both = serde_json::json!({"cpu": "1", "memory": "1Gi"});
        assert_eq!(
            qos_class(&pod(serde_json::json!({"requests": both, "limits": both}))),
            "Guaranteed"
        );
        assert_eq!(
            qos_class(&pod(serde_json::json!({"requests": {"cpu": "1"}}))),
            "Burstable"
        );
    }
}
