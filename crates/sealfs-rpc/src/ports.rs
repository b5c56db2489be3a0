//! Loopback ports chosen for processes that must keep their address across restarts (the
//! manager knows servers by address).
//!
//! Such a port is free when chosen and bound again by its process a moment later (and again at
//! each restart). A port of the kernel's ephemeral range may be taken in between as the local
//! port of some outgoing connection, so the ports are taken below that range when there is room.

use std::net::TcpListener;

/// The lowest port picked (below the kernel's ephemeral range).
pub const QUIET_PORT_MIN: u16 = 10_000;
/// Ports tried below the ephemeral range before one is taken from the kernel.
const QUIET_PORT_TRIES: usize = 64;

/// Binds `n` distinct loopback listeners on `host`, below the ephemeral range when there is
/// room. They are held until all are chosen, so that they differ; the caller reads their
/// addresses and drops them for its processes to bind.
pub fn quiet_listeners(host: &str, n: usize) -> std::io::Result<Vec<TcpListener>> {
    let first_ephemeral = first_ephemeral().unwrap_or(32768);
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).map_err(std::io::Error::other)?;
    let mut pick = u64::from_le_bytes(seed);
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let mut listener = None;
        for _ in 0..QUIET_PORT_TRIES {
            if first_ephemeral <= QUIET_PORT_MIN {
                break;
            }
            pick = pick
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let span = u64::from(first_ephemeral - QUIET_PORT_MIN);
            let port = QUIET_PORT_MIN + ((pick >> 33) % span) as u16;
            if let Ok(l) = TcpListener::bind((host, port)) {
                listener = Some(l);
                break;
            }
        }
        held.push(match listener {
            Some(l) => l,
            None => TcpListener::bind((host, 0))?,
        });
    }
    Ok(held)
}

/// The first port of the kernel's ephemeral range, if it says.
fn first_ephemeral() -> Option<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_below_the_ephemeral_range() {
        let held = quiet_listeners("127.0.0.1", 32).unwrap();
        let ports: std::collections::BTreeSet<u16> = held
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        assert_eq!(ports.len(), 32);
        if let Some(first) = first_ephemeral().filter(|f| *f > QUIET_PORT_MIN + 1000) {
            assert!(
                ports.iter().all(|p| (QUIET_PORT_MIN..first).contains(p)),
                "{ports:?}"
            );
        }
    }
}
