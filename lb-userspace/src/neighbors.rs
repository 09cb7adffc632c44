//! Keeps the load balancer's neighbour entries for its backends resolved: `bpf_fib_lookup`
//! reads the kernel's neighbour table but never resolves a missing entry itself, so each
//! backend gets a *managed* entry (`ip neigh replace ADDR dev DEV managed`, Linux 5.16+),
//! which the kernel keeps resolved on its own.

use std::{net::IpAddr, process::Command};

/// The device the kernel routes `addr` through, and the next hop if it is not on-link.
fn route(addr: IpAddr) -> Result<(String, IpAddr), String> {
    let out = Command::new("ip")
        .args(["-j", "route", "get", &addr.to_string()])
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    let routes: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("ip route get output: {e}"))?;
    let route = &routes[0];
    let dev = route["dev"]
        .as_str()
        .ok_or("no device in route")?
        .to_owned();
    let via = route["gateway"]
        .as_str()
        .and_then(|g| g.parse().ok())
        .unwrap_or(addr);
    Ok((dev, via))
}

/// Makes sure the next hop of every backend has a managed neighbour entry.
pub fn manage(backends: &[IpAddr]) -> Vec<String> {
    let mut problems = Vec::new();
    for &addr in backends {
        let result = route(addr).and_then(|(dev, hop)| {
            let out = Command::new("ip")
                .args(["neigh", "replace", &hop.to_string(), "dev", &dev, "managed"])
                .output()
                .map_err(|e| format!("running ip: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
            }
        });
        if let Err(e) = result {
            problems.push(format!("backend {addr}: {e}"));
        }
    }
    problems
}
