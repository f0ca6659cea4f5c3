//! The HTTP/1.1 path's sockets and buffers.
//!
//! A connection's socket goes through the proxy thread's io_uring
//! (`switchyard-uring`) while the thread serves enough clients to share its
//! enters (`[http] io_uring_connections`; `Local::place` moves sockets
//! between exchanges), unless `[http] io_uring = false` or the kernel
//! refuses it; otherwise through tokio. On the ring, each receive and send is an
//! operation the thread's one `io_uring_enter` per turn submits with all the
//! others, instead of a syscall of its own plus the epoll wake-ups.
//!
//! The ring takes owned buffers: a receive lends it the `Buf`'s memory, a
//! send lends a `Buf` or copies a head into the connection's own scratch
//! vector. A lent buffer whose wait ended early (a timeout) stays with the
//! kernel until its cancellation completes; the `Buf` then gets a fresh one.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::time::Duration;

use switchyard_uring::{Ring, Socket};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;

/// A read buffer with a window of unread bytes.
pub(crate) struct Buf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Buf {
    pub(crate) fn with_capacity(size: usize) -> Buf {
        Buf {
            data: vec![0; size],
            start: 0,
            end: 0,
        }
    }

    pub(crate) fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    pub(crate) fn len(&self) -> usize {
        self.end - self.start
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    pub(crate) fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    pub(crate) fn capacity(&self) -> usize {
        self.data.len()
    }

    /// The whole buffer as scratch space (for plain copies).
    pub(crate) fn space(&mut self) -> &mut [u8] {
        self.clear();
        &mut self.data
    }

    /// Doubles the buffer up to `max` when the last read filled it: large
    /// bodies then move in fewer, larger reads and writes.
    pub(crate) fn grow_if_full(&mut self, max: usize) {
        if self.end == self.data.len() && self.data.len() < max {
            let size = (self.data.len() * 2).min(max);
            self.data.resize(size, 0);
        }
    }

    /// Reads once from `conn` after the unread bytes; 0 means end of stream.
    pub(crate) async fn fill(&mut self, conn: &mut Conn) -> io::Result<usize> {
        self.fill_up_to(conn, usize::MAX).await
    }

    /// `fill`, reading at most `max` bytes.
    pub(crate) async fn fill_up_to(&mut self, conn: &mut Conn, max: usize) -> io::Result<usize> {
        if self.end == self.data.len() && self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.data.len() {
            return Err(io::Error::other("buffer full"));
        }
        let stop = self.end.saturating_add(max.max(1)).min(self.data.len());
        let n = match conn {
            Conn::Tokio(stream) => stream.read(&mut self.data[self.end..stop]).await?,
            Conn::Ring { socket, .. } => {
                let mut lent = Lent::new(&mut self.data);
                let (n, back) = socket.recv(lent.take(), self.end..stop).await;
                lent.give_back(back);
                n?
            }
            Conn::Closed => return Err(closed()),
        };
        self.end += n;
        Ok(n)
    }
}

/// A `Buf`'s memory while an operation has it: if the wait is abandoned
/// the buffer is replaced by a fresh one of the same size.
struct Lent<'a> {
    slot: &'a mut Vec<u8>,
    size: usize,
}

impl<'a> Lent<'a> {
    fn new(slot: &'a mut Vec<u8>) -> Lent<'a> {
        let size = slot.len();
        Lent { slot, size }
    }

    fn take(&mut self) -> Vec<u8> {
        std::mem::take(self.slot)
    }

    fn give_back(&mut self, buf: Vec<u8>) {
        *self.slot = buf;
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if self.slot.len() != self.size {
            *self.slot = vec![0; self.size];
        }
    }
}

/// A descriptor the ring gave back, registered with tokio's reactor again.
fn tokio_stream(fd: OwnedFd) -> Option<TcpStream> {
    TcpStream::from_std(std::net::TcpStream::from(fd)).ok()
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection handed on")
}

/// Whether the peer of an idle socket has sent nothing, neither bytes nor
/// its FIN (a peek that would block).
pub(crate) fn silent(fd: BorrowedFd<'_>) -> bool {
    let mut probe = [0u8; 1];
    let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
    matches!(
        rustix::net::recv(fd, &mut probe, flags),
        Err(rustix::io::Errno::AGAIN)
    )
}

/// One side of an exchange: the client's connection or an upstream one.
pub(crate) enum Conn {
    Tokio(TcpStream),
    Ring {
        socket: Socket,
        /// Heads are copied here to be sent (they are small; a `Buf` is
        /// lent instead).
        scratch: Vec<u8>,
    },
    /// Taken by a tunnel or HTTP/2; every operation fails.
    Closed,
}

impl Conn {
    /// `stream` on `ring` (leaving tokio's reactor), or as it is without one.
    pub(crate) fn new(stream: TcpStream, ring: Option<&Rc<Ring>>) -> Option<Conn> {
        let Some(ring) = ring else {
            return Some(Conn::Tokio(stream));
        };
        let std = stream.into_std().ok()?;
        Some(Conn::Ring {
            socket: Socket::new(ring, OwnedFd::from(std)),
            scratch: Vec::new(),
        })
    }

    /// The socket as a tokio stream (for hyper, a tunnel); `None` if it is
    /// gone or an abandoned operation still holds it.
    pub(crate) fn into_tokio(self) -> Option<TcpStream> {
        match self {
            Conn::Tokio(stream) => Some(stream),
            Conn::Ring { socket, .. } => tokio_stream(socket.into_fd().ok()?),
            Conn::Closed => None,
        }
    }

    /// Moves the socket onto `ring`, or back to tokio's reactor with `None`
    /// (between exchanges: nothing is in flight). A socket an abandoned
    /// operation still holds stays where it is; one that cannot be moved
    /// becomes `Closed`. True if it moved and is open.
    pub(crate) fn place(&mut self, ring: Option<&Rc<Ring>>) -> bool {
        match (&*self, ring) {
            (Conn::Tokio(_), Some(_)) | (Conn::Ring { .. }, None) => {}
            _ => return false,
        }
        let moved = match self.take() {
            Conn::Tokio(stream) => Conn::new(stream, ring),
            Conn::Ring { socket, scratch } => match socket.into_fd() {
                Ok(fd) => tokio_stream(fd).map(Conn::Tokio),
                Err(socket) => {
                    *self = Conn::Ring { socket, scratch };
                    return false;
                }
            },
            Conn::Closed => None,
        };
        let open = moved.is_some();
        *self = moved.unwrap_or(Conn::Closed);
        open
    }

    /// Takes the connection out, leaving `Closed`.
    pub(crate) fn take(&mut self) -> Conn {
        std::mem::replace(self, Conn::Closed)
    }

    pub(crate) async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.write_more(data, false).await
    }

    /// `write_all`; with `more`, the bytes may wait for the next write.
    async fn write_more(&mut self, data: &[u8], more: bool) -> io::Result<()> {
        match self {
            Conn::Tokio(stream) => stream.write_all(data).await,
            Conn::Ring { socket, scratch } => {
                scratch.clear();
                scratch.extend_from_slice(data);
                let out = std::mem::take(scratch);
                let (result, back) = socket.send_all(out, 0..data.len(), more).await;
                *scratch = back;
                result
            }
            Conn::Closed => Err(closed()),
        }
    }

    /// Writes the first `len` unread bytes of `buf` (not consumed).
    pub(crate) async fn write_buf(&mut self, buf: &mut Buf, len: usize) -> io::Result<()> {
        match self {
            Conn::Tokio(stream) => stream.write_all(&buf.filled()[..len]).await,
            Conn::Ring { socket, .. } => {
                let start = buf.start;
                if len > buf.len() {
                    return Err(io::Error::other("write past the unread bytes"));
                }
                let mut lent = Lent::new(&mut buf.data);
                let (result, back) = socket
                    .send_all(lent.take(), start..start + len, false)
                    .await;
                lent.give_back(back);
                result
            }
            Conn::Closed => Err(closed()),
        }
    }

    /// Writes `head`, then the first `len` unread bytes of `buf`, as one
    /// message where the socket allows (writev; on the ring, MSG_MORE).
    pub(crate) async fn write_both(
        &mut self,
        head: &[u8],
        buf: &mut Buf,
        len: usize,
    ) -> io::Result<()> {
        match self {
            Conn::Tokio(stream) => write_vectored_all(stream, head, &buf.filled()[..len]).await,
            _ => {
                self.write_more(head, true).await?;
                self.write_buf(buf, len).await
            }
        }
    }

    /// Ends the sending side (a polite close).
    pub(crate) async fn shutdown(&mut self) {
        match self {
            Conn::Tokio(stream) => {
                let _ = stream.shutdown().await;
            }
            Conn::Ring { socket, .. } => {
                let _ = rustix::net::shutdown(socket.as_fd(), rustix::net::Shutdown::Write);
            }
            Conn::Closed => {}
        }
    }

    /// The socket's descriptor, for calls made on it directly (splice).
    pub(crate) fn fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Conn::Tokio(stream) => Some(stream.as_fd()),
            Conn::Ring { socket, .. } => Some(socket.as_fd()),
            Conn::Closed => None,
        }
    }

    /// Whether an idle connection still looks usable (no EOF, no stray bytes).
    pub(crate) fn alive(&self) -> bool {
        self.fd().is_some_and(silent)
    }

    /// Waits until the socket is ready for `interest` after the kernel said
    /// EAGAIN to a call on its descriptor (splice), for at most `stall`.
    pub(crate) async fn ready(&self, interest: Interest, stall: Duration) -> Result<(), ()> {
        match self {
            Conn::Tokio(stream) => {
                // tokio's readiness may be stale: clear it first.
                let _ = stream.try_io(interest, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
                match tokio::time::timeout(stall, stream.ready(interest)).await {
                    Ok(Ok(_)) => Ok(()),
                    _ => Err(()),
                }
            }
            Conn::Ring { socket, .. } => {
                let writable = interest.is_writable();
                match tokio::time::timeout(stall, socket.ready(writable)).await {
                    Ok(Ok(())) => Ok(()),
                    _ => Err(()),
                }
            }
            Conn::Closed => Err(()),
        }
    }
}

/// Writes `a` then `b` with vectored writes, finishing partial ones.
async fn write_vectored_all(dst: &mut TcpStream, a: &[u8], b: &[u8]) -> io::Result<()> {
    let (mut a, mut b) = (a, b);
    while !a.is_empty() {
        let n = dst
            .write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n < a.len() {
            a = &a[n..];
        } else {
            b = &b[n - a.len()..];
            a = &[];
        }
    }
    if !b.is_empty() {
        dst.write_all(b).await?;
    }
    Ok(())
}
