//! Zero-downtime binary upgrade, as HAProxy, Envoy and pingora do it.
//!
//! The running agent listens on a Unix socket in its data directory. A new
//! `switchyard agent --upgrade` connects and asks for the listening sockets.
//! The old agent stops its API (requests in progress finish), stops the
//! registry writer so the store file is flushed and closed, then sends every
//! listening socket (SCM_RIGHTS) after a header that names them. The new
//! agent opens the store and serves on those very sockets: connections and
//! datagrams queued on them are taken by whichever process reads first, and
//! none is refused. Once it is ready it says so; the old agent then stops
//! accepting and finishes its work in progress as on SIGTERM.
//!
//! A new agent that fails first (it exits, or says nothing for two minutes
//! and is killed) leaves the old one serving: it reopens the store, starts a
//! fresh API, DNS and proxy on its own sockets, and the ones that served
//! through the attempt finish their work and stop (`agent::Predecessor`).

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::{TcpListener, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use switchyard_dns::DnsSockets;
use switchyard_proxy::ProxySockets;

/// The socket's file name in the data directory.
pub(crate) const SOCKET_FILE: &str = "switchyard.upgrade.sock";
/// Most descriptors one handover carries.
const MAX_FDS: usize = 250;
/// What the new agent sends to ask for the sockets.
const REQUEST: &[u8] = b"switchyard-upgrade 1\n";
/// What it sends once it serves.
const READY: &[u8] = b"ready\n";
/// How long the new agent may take from the sockets to serving.
const READY_WITHIN: Duration = Duration::from_secs(120);

/// Every listening socket of an agent.
#[derive(Default)]
pub(crate) struct Sockets {
    pub(crate) api: Option<TcpListener>,
    pub(crate) dns: Option<DnsSockets>,
    pub(crate) proxy: Option<ProxySockets>,
    /// The xDS listener, when xDS serves.
    pub(crate) xds: Option<TcpListener>,
}

/// Names the descriptors that follow it, in this order: api, DNS UDP, DNS
/// TCP, HTTP, HTTPS, each L4 listener's group, then xDS.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    version: u32,
    api: usize,
    dns_udp: usize,
    dns_tcp: usize,
    http: usize,
    #[serde(default)]
    tls: usize,
    tcp: Vec<usize>,
    /// Absent from an agent that had no xDS listener to hand over.
    #[serde(default)]
    xds: usize,
}

impl Sockets {
    fn header(&self) -> Header {
        Header {
            version: 1,
            api: usize::from(self.api.is_some()),
            dns_udp: self.dns.as_ref().map_or(0, |d| d.udp.len()),
            dns_tcp: usize::from(self.dns.is_some()),
            http: self.proxy.as_ref().map_or(0, |p| p.http.len()),
            tls: self.proxy.as_ref().map_or(0, |p| p.tls.len()),
            tcp: self
                .proxy
                .as_ref()
                .map_or_else(Vec::new, |p| p.tcp.iter().map(Vec::len).collect()),
            xds: usize::from(self.xds.is_some()),
        }
    }

    fn fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = Vec::new();
        if let Some(api) = &self.api {
            fds.push(api.as_fd());
        }
        if let Some(dns) = &self.dns {
            fds.extend(dns.udp.iter().map(AsFd::as_fd));
            fds.push(dns.tcp.as_fd());
        }
        if let Some(proxy) = &self.proxy {
            fds.extend(proxy.http.iter().map(AsFd::as_fd));
            fds.extend(proxy.tls.iter().map(AsFd::as_fd));
            for group in &proxy.tcp {
                fds.extend(group.iter().map(AsFd::as_fd));
            }
        }
        if let Some(xds) = &self.xds {
            fds.push(xds.as_fd());
        }
        fds
    }

    fn from_parts(header: &Header, fds: Vec<OwnedFd>) -> anyhow::Result<Sockets> {
        let expected = header.api
            + header.dns_udp
            + header.dns_tcp
            + header.http
            + header.tls
            + header.tcp.iter().sum::<usize>()
            + header.xds;
        anyhow::ensure!(
            header.version == 1 && fds.len() == expected,
            "the running agent sent {} sockets for a header that names {expected} ({header:?})",
            fds.len()
        );
        let mut fds = fds.into_iter();
        let mut take = |n: usize| fds.by_ref().take(n).collect::<Vec<OwnedFd>>();
        let api = take(header.api).pop().map(TcpListener::from);
        let udp: Vec<UdpSocket> = take(header.dns_udp)
            .into_iter()
            .map(UdpSocket::from)
            .collect();
        let dns = take(header.dns_tcp).pop().map(|tcp| DnsSockets {
            udp,
            tcp: TcpListener::from(tcp),
        });
        let http: Vec<TcpListener> = take(header.http)
            .into_iter()
            .map(TcpListener::from)
            .collect();
        let tls: Vec<TcpListener> = take(header.tls)
            .into_iter()
            .map(TcpListener::from)
            .collect();
        let tcp = header
            .tcp
            .iter()
            .map(|&n| take(n).into_iter().map(TcpListener::from).collect())
            .collect();
        let xds = take(header.xds).pop().map(TcpListener::from);
        Ok(Sockets {
            api,
            dns,
            proxy: Some(ProxySockets { http, tcp, tls }),
            xds,
        })
    }
}

/// The new agent's side: takes the sockets of the agent running on
/// `data_dir`. The returned stream says `ready` later (see `ready`).
pub(crate) fn take_over(data_dir: &Path) -> anyhow::Result<(Sockets, UnixStream)> {
    let path = data_dir.join(SOCKET_FILE);
    let mut stream = UnixStream::connect(&path).with_context(|| {
        format!(
            "--upgrade: no running agent answers on {} (is one running on this data directory?)",
            path.display()
        )
    })?;
    // The old agent finishes its API requests and flushes its store first.
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    stream.write_all(REQUEST)?;
    let mut data = vec![0u8; 64 * 1024];
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut data)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .context("--upgrade: receiving the sockets")?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    let text = data.get(..received.bytes).unwrap_or_default();
    let line = text.split(|&b| b == b'\n').next().unwrap_or_default();
    let header: Header = serde_json::from_slice(line).with_context(|| {
        format!(
            "--upgrade: bad header from the running agent: {:?}",
            String::from_utf8_lossy(line)
        )
    })?;
    let sockets = Sockets::from_parts(&header, fds)?;
    Ok((sockets, stream))
}

/// Tells the old agent that the new one serves.
/// Test hook: `SWITCHYARD_TEST_DIE_BEFORE_READY_MS=N` makes a successor
/// serve N ms without having said `ready`, then exit 1 as if it crashed
/// there (what the upgrade must survive without losing a connection).
pub(crate) fn die_before_ready_for_tests() {
    let Some(ms) = std::env::var("SWITCHYARD_TEST_DIE_BEFORE_READY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    std::thread::sleep(Duration::from_millis(ms));
    tracing::error!("SWITCHYARD_TEST_DIE_BEFORE_READY_MS: exiting before ready (a test hook)");
    std::process::exit(1);
}

pub(crate) fn ready(mut stream: UnixStream) {
    if let Err(e) = stream.write_all(READY) {
        tracing::warn!(error = %e, "could not tell the old agent that this one is ready");
    }
}

/// The running agent's side: where upgrade requests arrive.
pub(crate) struct UpgradeListener {
    listener: tokio::net::UnixListener,
    path: PathBuf,
}

impl UpgradeListener {
    /// Listens in `data_dir`. The store lock is already ours, so a socket
    /// file left there belongs to a dead agent (or to the one we replace,
    /// which no longer needs it) and is replaced.
    pub(crate) fn bind(data_dir: &Path) -> io::Result<UpgradeListener> {
        let path = data_dir.join(SOCKET_FILE);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = tokio::net::UnixListener::bind(&path)?;
        Ok(UpgradeListener { listener, path })
    }

    /// Removes the socket file (at a plain shutdown; after a handover the
    /// file belongs to the new agent).
    pub(crate) fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// The next well-formed upgrade request.
    pub(crate) async fn next(&self) -> UnixStream {
        loop {
            let Ok((stream, _)) = self.listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            match read_request(stream).await {
                Ok(stream) => return stream,
                Err(e) => tracing::warn!(error = %e, "ignored a bad upgrade request"),
            }
        }
    }
}

async fn read_request(stream: tokio::net::UnixStream) -> io::Result<UnixStream> {
    use tokio::io::AsyncReadExt;
    let mut stream = stream;
    let mut request = vec![0u8; REQUEST.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut request))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request within 5 s"))??;
    if request != REQUEST {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown request {:?}", String::from_utf8_lossy(&request)),
        ));
    }
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// How a handover ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Handed {
    /// The new agent serves.
    Ready,
    /// It hung up before it served: it has exited.
    Gone,
    /// It did not say `ready` within the limit (or said something else),
    /// so it was killed: it holds the store and must not serve half-started.
    Silent,
}

/// Sends `sockets` to the new agent, then waits (bounded) for it to say it
/// serves.
pub(crate) fn hand_over(stream: &mut UnixStream, sockets: &Sockets) -> anyhow::Result<Handed> {
    let fds = sockets.fds();
    anyhow::ensure!(
        fds.len() <= MAX_FDS,
        "{} sockets is more than one handover carries",
        fds.len()
    );
    let successor = rustix::net::sockopt::socket_peercred(&*stream).map(|cred| cred.pid);
    let mut header = serde_json::to_vec(&sockets.header())?;
    header.push(b'\n');
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    anyhow::ensure!(
        control.push(SendAncillaryMessage::ScmRights(&fds)),
        "the descriptors do not fit the control buffer"
    );
    rustix::net::sendmsg(
        stream.as_fd(),
        &[IoSlice::new(&header)],
        &mut control,
        SendFlags::empty(),
    )
    .context("sending the sockets")?;
    stream.set_read_timeout(Some(READY_WITHIN))?;
    let mut answer = vec![0u8; READY.len()];
    match stream.read_exact(&mut answer) {
        Ok(()) if answer == READY => Ok(Handed::Ready),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
            ) =>
        {
            Ok(Handed::Gone)
        }
        _ => {
            match successor {
                Ok(pid) => {
                    if let Err(e) =
                        rustix::process::kill_process(pid, rustix::process::Signal::KILL)
                    {
                        tracing::warn!(error = %e, pid = pid.as_raw_nonzero().get(), "cannot stop the silent successor");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the silent successor's PID is unknown: it is left running")
                }
            }
            Ok(Handed::Silent)
        }
    }
}

/// How this agent starts its own successor on SIGUSR2: the binary at the
/// path it was started from (where a new version is installed) with the same
/// arguments plus `--upgrade`. Under systemd the successor is then in the
/// unit's cgroup and takes the main PID over (`MAINPID=`), which `agent
/// --upgrade` started from a shell cannot.
pub(crate) struct Successor {
    exe: PathBuf,
    args: Vec<std::ffi::OsString>,
    /// A successor is running: a second SIGUSR2 must not start another.
    started: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Successor {
    /// Read at start: later, `/proc/self/exe` names a replaced binary as
    /// "(deleted)".
    pub(crate) fn of_this_process() -> io::Result<Successor> {
        Ok(Successor {
            exe: std::env::current_exe()?,
            args: std::env::args_os()
                .skip(1)
                .filter(|arg| arg != "--upgrade")
                .collect(),
            started: Default::default(),
        })
    }

    /// Starts the successor. It connects to this agent's upgrade socket and
    /// the handover runs as for `agent --upgrade`; if it fails before that,
    /// its exit is logged and this agent keeps serving.
    pub(crate) fn spawn(&self) -> io::Result<u32> {
        use std::sync::atomic::Ordering;
        if self.started.swap(true, Ordering::SeqCst) {
            return Err(io::Error::other("a successor is already starting"));
        }
        let spawned = std::process::Command::new(&self.exe)
            .args(&self.args)
            .arg("--upgrade")
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                self.started.store(false, Ordering::SeqCst);
                return Err(e);
            }
        };
        let pid = child.id();
        let started = self.started.clone();
        std::thread::spawn(move || {
            match child.wait() {
                Ok(status) if status.success() => {}
                Ok(status) => tracing::error!(pid, %status, "the successor agent exited"),
                Err(e) => tracing::warn!(pid, error = %e, "cannot wait for the successor agent"),
            }
            started.store(false, Ordering::SeqCst);
        });
        Ok(pid)
    }
}

/// What the agent tells the service manager.
#[derive(Clone, Copy)]
pub(crate) enum Lifecycle {
    /// Serving, with this process as the main one.
    Ready,
    /// Re-reading the configuration (`Ready` follows).
    Reloading,
    Stopping,
}

/// Tells the service manager (systemd's `NOTIFY_SOCKET`, when set) how the
/// agent is doing.
pub(crate) fn notify(state: Lifecycle) {
    use sd_notify::NotifyState;
    let sent = match state {
        Lifecycle::Ready => sd_notify::notify(
            false,
            &[NotifyState::MainPid(std::process::id()), NotifyState::Ready],
        ),
        // systemd 253+ wants the clock with it (Type=notify-reload).
        Lifecycle::Reloading => NotifyState::monotonic_usec_now()
            .and_then(|now| sd_notify::notify(false, &[NotifyState::Reloading, now])),
        Lifecycle::Stopping => sd_notify::notify(false, &[NotifyState::Stopping]),
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}
