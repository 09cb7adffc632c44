//! Types and algorithms shared by the XDP data plane (`lb-ebpf`), the daemon
//! (`lb-userspace`) and the tests, so that all of them compute exactly the same thing.
//!
//! # Glossary
//! - **Vip**: a virtual service address, `(address, port, protocol)`; port 0 matches every
//!   port of that address and protocol.
//! - **Backend**: a real server behind a Vip, identified by its address.
//! - **Pool**: the set of Backends (with weights) that serves a Vip.
//! - **MaglevTable**: the per-Vip lookup table of `M` slots (M prime), each holding a
//!   Backend id; a new Flow goes to `table[flow_hash % M]`.
//! - **Flow**: a 5-tuple (source, destination, ports, protocol); its packets stay on one
//!   Backend through the connection table.
#![cfg_attr(not(feature = "user"), no_std)]

pub mod conntrack;
pub mod consts;
pub mod hash;
#[cfg(feature = "user")]
pub mod maglev;
pub mod types;
