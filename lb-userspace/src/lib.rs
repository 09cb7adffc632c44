//! `mlb`, the Maglev load balancer daemon: a library so that tests drive exactly what the
//! binary runs.

pub mod announce;
pub mod attach;
pub mod backend;
pub mod bpf_sys;
pub mod cli;
pub mod commands;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod health;
pub mod metrics;
pub mod netlink;
pub mod next_program;
pub mod pinned;
pub mod reconcile;
pub mod second_chance;
pub mod state;
