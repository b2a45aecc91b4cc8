//! NodeResourcesFit scoring (upstream's strategies, cpu and memory weighted equally): least
//! allocated spreads pods; most allocated packs them, so that idle VMs can be given back.

use crate::{node_info::NodeInfo, resources::Resources};

/// How nodes are ranked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Prefer the emptiest node (upstream's default).
    #[default]
    LeastAllocated,
    /// Prefer the fullest node that fits (bin packing).
    MostAllocated,
}

/// Highest score a node gets.
pub const MAX_SCORE: i64 = 100;

fn resource_score(strategy: Strategy, requested: i64, allocatable: i64) -> i64 {
    if allocatable <= 0 {
        return 0;
    }
    let requested = requested.clamp(0, allocatable);
    match strategy {
        Strategy::LeastAllocated => (allocatable - requested) * MAX_SCORE / allocatable,
        Strategy::MostAllocated => requested * MAX_SCORE / allocatable,
    }
}

/// The node's score (0..=100) if the pod were placed on it.
pub fn score(strategy: Strategy, request: &Resources, info: &NodeInfo) -> i64 {
    let have = &info.allocatable;
    let used = &info.requested;
    // Upstream scores pods without requests as if they asked for 100m cpu and 200Mi memory,
    // so that they still spread.
    let cpu = if request.milli_cpu == 0 {
        100
    } else {
        request.milli_cpu
    };
    let memory = if request.memory == 0 {
        200 << 20
    } else {
        request.memory
    };
    let cpu_score = resource_score(strategy, used.milli_cpu + cpu, have.milli_cpu);
    let memory_score = resource_score(strategy, used.memory + memory, have.memory);
    (cpu_score + memory_score) / 2
}
