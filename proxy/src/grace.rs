//! How long a shutdown waits for connections that have a request on its way.

use std::time::Duration;

/// How long a shutdown waits for a connection it accepted to send its first
/// request. Closing it at once would lose a request that was on its way: a
/// client retries only on a reused connection, never on a new one.
pub(crate) const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);

/// How long a shutdown keeps idle keep-alive connections open. A client
/// under load sends its next request the moment a response arrives; closing
/// its connection then would lose that request (wrk counts a read error, a
/// browser retries). Within this window it is served with `Connection:
/// close` instead, and the client opens a new connection (to the successor,
/// at an upgrade). Connections idle for all of it are closed at its end.
pub(crate) const IDLE_DRAIN: Duration = Duration::from_secs(1);
