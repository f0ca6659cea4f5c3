//! The cap on open connections per client address
//! (`http.max_connections_per_client`, across the HTTP, HTTPS and L4
//! listeners).

use std::net::IpAddr;
use std::sync::Arc;

use crate::shared::Shared;

/// One client connection counted against `max_connections_per_client`;
/// released when dropped.
pub(crate) struct ClientPermit {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for ClientPermit {
    fn drop(&mut self) {
        if let Ok(mut clients) = self.shared.clients.lock() {
            if let Some(open) = clients.get_mut(&self.ip) {
                *open -= 1;
                if *open == 0 {
                    clients.remove(&self.ip);
                }
            }
        }
    }
}

/// Counts a new connection from `ip` against `max` (0 = no cap): `Ok(None)`
/// when uncounted, `Ok(Some(slot))` when counted, `Err(())` when the client
/// is at its cap.
pub(crate) fn client_permit(
    shared: &Arc<Shared>,
    ip: IpAddr,
    max: usize,
) -> Result<Option<ClientPermit>, ()> {
    if max == 0 {
        return Ok(None);
    }
    let Ok(mut clients) = shared.clients.lock() else {
        return Ok(None);
    };
    let open = clients.entry(ip).or_insert(0);
    if *open >= max {
        return Err(());
    }
    *open += 1;
    Ok(Some(ClientPermit {
        shared: shared.clone(),
        ip,
    }))
}
