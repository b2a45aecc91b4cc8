//! The parts of the `canopy` binary that its tests and benchmarks share.

pub mod procs;
