//! Shared by the BPF_PROG_TEST_RUN fixture tests and the per-packet benchmark: a network
//! namespace with a veth the packets pretend to arrive on, the real XDP object loaded with
//! a fixed set of Vips and Backends, and packet builders.
#![allow(dead_code, reason = "each test binary uses a different part")]

pub mod daemon;
pub mod lab;
pub mod model;
pub mod packets;
