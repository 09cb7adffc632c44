//! `mlb`, the Maglev load balancer daemon: a library so that tests drive exactly what the
//! binary runs.

pub mod dataplane;
pub mod netns;
pub mod testbed;
