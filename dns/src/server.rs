//! Listeners: UDP workers (one SO_REUSEPORT socket and thread each, blocking
//! I/O, no allocation per query) and a TCP server on the agent's runtime.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::answer::{Engine, Scratch, Transport};

/// How often a blocked UDP worker looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(200);

fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    socket.set_recv_buffer_size(4 << 20)?;
    socket.bind(&addr.into())?;
    let socket: UdpSocket = socket.into();
    socket.set_read_timeout(Some(STOP_POLL))?;
    Ok(socket)
}

/// Binds `workers` UDP sockets on one address (the first decides the port
/// when it is 0) and starts a thread on each.
pub(crate) fn spawn_udp(
    engine: Arc<Engine>,
    addr: SocketAddr,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> io::Result<(SocketAddr, Vec<JoinHandle<()>>)> {
    let first = udp_socket(addr)?;
    let bound = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..workers {
        sockets.push(udp_socket(bound)?);
    }
    let mut handles = Vec::new();
    for (i, socket) in sockets.into_iter().enumerate() {
        let engine = engine.clone();
        let stop = stop.clone();
        let handle = std::thread::Builder::new()
            .name(format!("dns-udp-{i}"))
            .spawn(move || udp_worker(&engine, &socket, &stop))?;
        handles.push(handle);
    }
    Ok((bound, handles))
}

fn udp_worker(engine: &Engine, socket: &UdpSocket, stop: &AtomicBool) {
    let mut packet = [0u8; 4096];
    let mut out = Vec::with_capacity(4096);
    let mut scratch = Scratch::new();
    while !stop.load(Ordering::Relaxed) {
        let (len, peer) = match socket.recv_from(&mut packet) {
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::warn!(error = %e, "dns udp receive failed");
                continue;
            }
        };
        let started = Instant::now();
        match engine.answer(&packet[..len], Transport::Udp, &mut out, &mut scratch) {
            Some(outcome) => {
                engine
                    .metrics
                    .count(outcome.qtype, outcome.rcode, outcome.truncated);
                if let Err(e) = socket.send_to(&out, peer) {
                    tracing::debug!(error = %e, %peer, "dns udp send failed");
                }
            }
            None => engine.metrics.dropped.inc(),
        }
        engine
            .metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Accepts TCP connections until `stop` turns true.
pub(crate) async fn serve_tcp(
    engine: Arc<Engine>,
    listener: TcpListener,
    max_connections: usize,
    idle: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(max_connections));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (stream, peer) = match accepted {
            Ok(got) => got,
            Err(e) => {
                tracing::warn!(error = %e, "dns tcp accept failed");
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "dns tcp connection refused: too many connections");
            continue;
        };
        engine.metrics.tcp_connections.inc();
        let engine = engine.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = tcp_connection(&engine, stream, idle, stop).await {
                tracing::debug!(error = %e, %peer, "dns tcp connection ended");
            }
        });
    }
}

async fn tcp_connection(
    engine: &Engine,
    mut stream: TcpStream,
    idle: Duration,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut packet = vec![0u8; 65535];
    let mut out = Vec::with_capacity(4096);
    let mut scratch = Scratch::new();
    loop {
        let mut len = [0u8; 2];
        tokio::select! {
            read = tokio::time::timeout(idle, stream.read_exact(&mut len)) => match read {
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(()),
            },
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        let len = usize::from(u16::from_be_bytes(len));
        tokio::time::timeout(idle, stream.read_exact(&mut packet[..len]))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "slow client"))??;
        let started = Instant::now();
        let Some(outcome) = engine.answer(&packet[..len], Transport::Tcp, &mut out, &mut scratch)
        else {
            engine.metrics.dropped.inc();
            return Ok(());
        };
        engine
            .metrics
            .count(outcome.qtype, outcome.rcode, outcome.truncated);
        engine
            .metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        let mut framed = Vec::with_capacity(out.len() + 2);
        framed.extend_from_slice(&(out.len() as u16).to_be_bytes());
        framed.extend_from_slice(&out);
        stream.write_all(&framed).await?;
    }
}
