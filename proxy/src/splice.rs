//! Large bodies moved in the kernel: socket → pipe → socket with splice(2).
//!
//! A read and a write copy every body byte into and out of user space; splice
//! passes the socket's pages through a pipe instead. For a 64 KiB response
//! that saves two 64 KiB copies per request, while the syscall count stays
//! one in and one out per buffer's worth. Small bodies gain nothing (a pipe
//! round trip costs more than copying a few KiB), so only a body with at
//! least `SPLICE_ABOVE` bytes still to come takes this path.
//!
//! Readiness: splice runs on the raw descriptors; only an EAGAIN that must
//! come from the socket (the pipe is empty on the way in; on the way out the
//! pipe holds data, so only the socket's send buffer can be full) waits for
//! the socket (`Conn::ready`: tokio's readiness, cleared first, or a poll on
//! the thread's ring). An EAGAIN from a full pipe never does, so no wake-up
//! is lost.

use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;

use crate::conn::Pace;
use crate::io::Conn;

/// A body with at least this many bytes left to move is spliced.
pub(crate) const SPLICE_ABOVE: u64 = 32 * 1024;

/// The pipe size asked for: a few loopback segments' worth.
const PIPE_BYTES: usize = 256 * 1024;

/// A pipe between two sockets, empty between bodies.
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
}

impl Pipe {
    pub(crate) fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Above the 64 KiB default when the system allows; the default works.
        let size = match fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_BYTES as _)) {
            Ok(size) => usize::try_from(size).unwrap_or(64 * 1024),
            Err(_) => 64 * 1024,
        };
        Ok(Pipe { read, write, size })
    }
}

/// Which end of a splice failed (the pipe is unusable after either).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Broken {
    /// The source ended early, failed, or stalled.
    Source,
    /// The destination failed or stalled.
    Sink,
    /// The source fell below its minimum rate (`Pace`).
    Slow,
    /// The kernel cannot splice these sockets (nothing was moved): copy.
    Unsupported,
}

/// Moves exactly `len` bytes from `src` to `dst` through `pipe`. Each wait
/// for either socket is limited to `stall`, and a wait for the source also
/// by `pace` (with `moved` bytes of the body already through) when given. On
/// `Ok` (and `Unsupported`) the pipe is empty again and can be reused; on
/// another `Err` it must be dropped.
pub(crate) async fn exact(
    pipe: &Pipe,
    src: &Conn,
    dst: &Conn,
    len: u64,
    stall: Duration,
    pace: Option<(Pace, u64)>,
) -> Result<(), Broken> {
    let (Some(from), Some(to)) = (src.fd(), dst.fd()) else {
        return Err(Broken::Source);
    };
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut left = len;
    while left > 0 {
        // In: as much as the socket has, up to what the pipe takes.
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(pipe.size);
        let held = match splice(from, None, &pipe.write, None, want, flags) {
            Ok(0) => return Err(Broken::Source),
            Ok(n) => n,
            Err(Errno::EAGAIN) => {
                // The pipe is empty here, so the socket has nothing.
                let (wait, by_rate) = match pace {
                    Some((pace, moved)) => pace.wait(moved + (len - left), stall),
                    None => (stall, false),
                };
                let slow = || {
                    if by_rate {
                        Broken::Slow
                    } else {
                        Broken::Source
                    }
                };
                if wait.is_zero() {
                    return Err(slow());
                }
                src.ready(Interest::READABLE, wait)
                    .await
                    .map_err(|()| slow())?;
                continue;
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) if left == len => {
                return Err(Broken::Unsupported)
            }
            Err(_) => return Err(Broken::Source),
        };
        left -= held as u64;
        // Out: all of it, before reading more.
        let more = if left > 0 {
            flags | SpliceFFlags::SPLICE_F_MORE
        } else {
            flags
        };
        let mut held = held;
        while held > 0 {
            match splice(&pipe.read, None, to, None, held, more) {
                Ok(0) => return Err(Broken::Sink),
                Ok(n) => held -= n,
                Err(Errno::EAGAIN) => dst
                    .ready(Interest::WRITABLE, stall)
                    .await
                    .map_err(|()| Broken::Sink)?,
                Err(Errno::EINTR) => {}
                Err(_) => return Err(Broken::Sink),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;
    use switchyard_uring::Ring;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A connected pair: (the peer's side, the side splice uses, on `ring`
    /// when one is given).
    async fn pair(ring: Option<&Rc<Ring>>) -> (TcpStream, Conn) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let ours = Conn::new(b.expect("accept").0, ring).expect("conn");
        (a.expect("connect"), ours)
    }

    /// Runs `test` on a current-thread runtime, with the sockets on tokio
    /// and then on a driven ring.
    fn on_both<F: std::future::Future<Output = ()>>(test: impl Fn(Option<Rc<Ring>>) -> F) {
        for on_ring in [false, true] {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            tokio::task::LocalSet::new().block_on(&runtime, async {
                let ring = on_ring.then(|| {
                    let ring = Ring::new().expect("io_uring (Linux >= 6.0) is needed here");
                    tokio::task::spawn_local(ring.clone().drive());
                    ring
                });
                tokio::time::timeout(Duration::from_secs(20), test(ring))
                    .await
                    .expect("test timed out");
            });
        }
    }

    /// Bytes that show a reordering or a loss: position-dependent.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn moves_exactly_the_length_and_leaves_what_follows() {
        on_both(|ring| async move {
            let (mut writer, src) = pair(ring.as_ref()).await;
            let (mut reader, dst) = pair(ring.as_ref()).await;
            let body = pattern(3 * 1024 * 1024 + 17);
            let sent = body.clone();
            let feed = tokio::spawn(async move {
                writer.write_all(&sent).await.expect("feed");
                writer.write_all(b"NEXT").await.expect("feed");
                writer
            });
            let drain = tokio::spawn(async move {
                let mut got = vec![0; 3 * 1024 * 1024 + 17];
                // A slow reader: the destination's send buffer fills and splice waits.
                tokio::time::sleep(Duration::from_millis(50)).await;
                reader.read_exact(&mut got).await.expect("drain");
                got
            });
            let pipe = Pipe::new().expect("pipe");
            exact(
                &pipe,
                &src,
                &dst,
                body.len() as u64,
                Duration::from_secs(10),
                None,
            )
            .await
            .expect("splice");
            let got = drain.await.expect("drain task");
            assert!(got == body, "the spliced bytes differ from the sent ones");
            let _writer = feed.await.expect("feed task");
            let mut next = [0; 4];
            let mut src = src.into_tokio().expect("tokio stream");
            src.read_exact(&mut next).await.expect("next");
            assert_eq!(&next, b"NEXT", "splice took bytes past the length");
        });
    }

    #[test]
    fn a_source_that_ends_early_is_an_error_not_a_hang() {
        on_both(|ring| async move {
            let (mut writer, src) = pair(ring.as_ref()).await;
            let (_reader, dst) = pair(ring.as_ref()).await;
            writer.write_all(&pattern(100_000)).await.expect("feed");
            drop(writer);
            let pipe = Pipe::new().expect("pipe");
            let result = exact(&pipe, &src, &dst, 200_000, Duration::from_secs(10), None).await;
            assert_eq!(result, Err(Broken::Source));
        });
    }

    #[test]
    fn a_stalled_source_times_out() {
        on_both(|ring| async move {
            let (mut writer, src) = pair(ring.as_ref()).await;
            let (_reader, dst) = pair(ring.as_ref()).await;
            writer.write_all(&pattern(1000)).await.expect("feed");
            let pipe = Pipe::new().expect("pipe");
            let result = exact(&pipe, &src, &dst, 200_000, Duration::from_millis(100), None).await;
            assert_eq!(result, Err(Broken::Source));
            drop(writer);
        });
    }

    #[test]
    fn a_source_below_its_pace_is_slow_long_before_it_stalls() {
        on_both(|ring| async move {
            let (mut writer, src) = pair(ring.as_ref()).await;
            let (mut reader, dst) = pair(ring.as_ref()).await;
            // 1,000 bytes every 20 ms: 50 KB/s against a pace of 200 KB/s.
            let feed = tokio::spawn(async move {
                for _ in 0..200 {
                    if writer.write_all(&pattern(1000)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
            let drain = tokio::spawn(async move {
                let mut sink = vec![0; 65536];
                while matches!(reader.read(&mut sink).await, Ok(n) if n > 0) {}
            });
            let pipe = Pipe::new().expect("pipe");
            let pace = crate::conn::Pace::new(200_000, Duration::from_millis(100));
            let started = std::time::Instant::now();
            let result = exact(
                &pipe,
                &src,
                &dst,
                200_000,
                Duration::from_secs(10),
                pace.map(|p| (p, 0)),
            )
            .await;
            assert_eq!(result, Err(Broken::Slow));
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "cut by the pace, not the stall"
            );
            feed.abort();
            drain.abort();
        });
    }
}
