//! Who may open one more connection: the cap on a listener's (or role's)
//! open connections, and on those of one client address. Every role's
//! listeners count through this, so a flood from one place can take no
//! more than its share of the agent's descriptors (the caps come from the
//! descriptor budget the agent draws at start).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The open connections of one listener or role.
#[derive(Debug, Default)]
pub struct Admission {
    open: AtomicUsize,
    clients: Mutex<HashMap<IpAddr, usize>>,
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The listener (or role) has `max_total` open.
    Full,
    /// This client address has `max_per_client` open.
    Client,
}

impl Refusal {
    /// The metric label of the refusal.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Full => "connection_limit",
            Refusal::Client => "client_connection_limit",
        }
    }
}

/// One admitted connection; its counts are released when dropped.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    client: Option<IpAddr>,
}

impl Admission {
    pub fn new() -> Arc<Admission> {
        Arc::new(Admission::default())
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Counts a new connection from `ip` when it is under both caps (0 = no
    /// cap). The caps are given at each call, so a reload applies at once.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        max_total: usize,
        max_per_client: usize,
    ) -> Result<Ticket, Refusal> {
        let was = self.open.fetch_add(1, Ordering::Relaxed);
        let mut ticket = Ticket {
            admission: self.clone(),
            client: None,
        };
        if max_total != 0 && was >= max_total {
            return Err(Refusal::Full);
        }
        if max_per_client == 0 {
            return Ok(ticket);
        }
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let open = clients.entry(ip).or_insert(0);
        if *open >= max_per_client {
            return Err(Refusal::Client);
        }
        *open += 1;
        ticket.client = Some(ip);
        Ok(ticket)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(ip) = self.client {
            let mut clients = self
                .admission
                .clients
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(open) = clients.get_mut(&ip) {
                *open -= 1;
                if *open == 0 {
                    clients.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_the_listener_and_each_client_and_releases_on_drop() {
        let admission = Admission::new();
        let a: IpAddr = [127, 0, 0, 2].into();
        let b: IpAddr = [127, 0, 0, 3].into();
        let first = admission.admit(a, 3, 2).expect("first");
        let second = admission.admit(a, 3, 2).expect("second");
        assert_eq!(
            admission.admit(a, 3, 2).expect_err("at the client cap"),
            Refusal::Client
        );
        let third = admission.admit(b, 3, 2).expect("another client");
        assert_eq!(
            admission.admit(b, 3, 2).expect_err("at the listener cap"),
            Refusal::Full
        );
        assert_eq!(admission.open(), 3, "refusals hold nothing");
        drop(first);
        assert!(admission.admit(a, 3, 2).is_ok());
        drop((second, third));
        assert_eq!(admission.open(), 0);
        assert!(admission.clients.lock().expect("lock").is_empty());
        let unlimited: Vec<_> = (0..100).map(|_| admission.admit(a, 0, 0)).collect();
        assert!(unlimited.iter().all(Result::is_ok));
    }
}
