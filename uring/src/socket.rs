//! Sockets whose receives and sends go through the ring, for a task that
//! awaits each operation in turn (the proxy's HTTP/1.1 exchange).
//!
//! The buffers are owned: an operation takes a `Vec<u8>` and gives it back
//! with its result. The kernel may write a receive buffer until the
//! operation's completion, even after the task stopped waiting (a timeout
//! dropped the future), so while it is in flight the buffer belongs to the
//! operation (`Op`), which the ring's reference keeps alive; a dropped wait
//! cancels the operation, and its completion frees the buffer. The `Op` also
//! holds the descriptor open, so its number is not reused while the kernel
//! may still act on it.

use std::cell::Cell;
use std::future::poll_fn;
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::task::{Poll, Waker};

use io_uring::types::Fd;
use io_uring::{opcode, squeue};

use crate::{Ring, OP, RECVSEND_POLL_FIRST};

/// A connected socket driven through a [`Ring`].
pub struct Socket {
    ring: Rc<Ring>,
    fd: Rc<OwnedFd>,
}

/// One operation in flight.
pub(crate) struct Op {
    /// Kept open while the kernel may act on it.
    _fd: Rc<OwnedFd>,
    /// The memory the kernel reads or writes, handed back once `result` is set.
    buf: Cell<Option<Vec<u8>>>,
    result: Cell<Option<i32>>,
    waker: Cell<Option<Waker>>,
}

const _: () = assert!(std::mem::align_of::<Op>() > crate::TAGS as usize);

impl Op {
    pub(crate) fn data(self: &Rc<Op>) -> u64 {
        Rc::as_ptr(self) as u64 | OP
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.result.get().is_some()
    }

    /// Records a completion and wakes the task waiting for it.
    pub(crate) fn complete(&self, result: i32) {
        self.result.set(Some(result));
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

/// Cancels the operation if its wait ends before it does.
struct Waiting<'a> {
    ring: &'a Ring,
    op: &'a Rc<Op>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.op.result.get().is_none() {
            self.op.waker.take();
            self.ring.cancel(self.op);
        }
    }
}

/// `POLLIN` and `POLLOUT`.
const POLLIN: u32 = 0x1;
const POLLOUT: u32 = 0x4;

impl Socket {
    /// Takes `fd` (a connected stream socket, nonblocking or not) into the
    /// ring's hands. The ring arms a readiness wait for a socket operation
    /// that cannot complete at once, whatever the descriptor's O_NONBLOCK.
    pub fn new(ring: &Rc<Ring>, fd: OwnedFd) -> Socket {
        Socket {
            ring: ring.clone(),
            fd: Rc::new(fd),
        }
    }

    /// Gives the descriptor back, or the socket itself while an abandoned
    /// operation still holds it.
    pub fn into_fd(self) -> Result<OwnedFd, Socket> {
        Rc::try_unwrap(self.fd).map_err(|fd| Socket {
            ring: self.ring,
            fd,
        })
    }

    /// Receives into `buf[range]`; 0 bytes means end of stream.
    pub async fn recv(&self, buf: Vec<u8>, range: Range<usize>) -> (io::Result<usize>, Vec<u8>) {
        if range.start >= range.end || range.end > buf.len() {
            return (Err(io::Error::other("no room to receive into")), buf);
        }
        self.repeat(buf, false, |fd, buf| {
            // Within `buf`: `start < end <= buf.len()`, checked above.
            let start = buf.as_mut_ptr().wrapping_add(range.start);
            opcode::Recv::new(fd, start, range.len() as u32)
                .ioprio(RECVSEND_POLL_FIRST)
                .build()
        })
        .await
    }

    /// Sends `buf[range]` once (a short send is possible); with `more`, the
    /// kernel may hold the bytes for the send that follows (`MSG_MORE`).
    pub async fn send(
        &self,
        buf: Vec<u8>,
        range: Range<usize>,
        more: bool,
    ) -> (io::Result<usize>, Vec<u8>) {
        if range.start > range.end || range.end > buf.len() {
            return (Err(io::Error::other("send range outside the buffer")), buf);
        }
        let mut flags = rustix::net::SendFlags::NOSIGNAL;
        if more {
            flags |= rustix::net::SendFlags::MORE;
        }
        self.repeat(buf, true, |fd, buf| {
            let start = buf.as_mut_ptr().wrapping_add(range.start);
            opcode::Send::new(fd, start, range.len() as u32)
                .flags(flags.bits() as i32)
                .build()
        })
        .await
    }

    /// Sends all of `buf[range]`.
    pub async fn send_all(
        &self,
        mut buf: Vec<u8>,
        mut range: Range<usize>,
        more: bool,
    ) -> (io::Result<()>, Vec<u8>) {
        while !range.is_empty() {
            let (result, back) = self.send(buf, range.clone(), more).await;
            buf = back;
            match result {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
                Ok(n) => range.start += n,
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    /// Waits until the socket is readable (or writable): for calls made on
    /// the descriptor directly, such as splice(2).
    pub async fn ready(&self, writable: bool) -> io::Result<()> {
        let mask = if writable { POLLOUT } else { POLLIN };
        let sqe = opcode::PollAdd::new(Fd(self.fd.as_raw_fd()), mask).build();
        match self.run(None, sqe).await.0 {
            result if result < 0 => Err(io::Error::from_raw_os_error(-result)),
            _ => Ok(()),
        }
    }

    /// Runs a receive or send on `buf` to its completion: again after
    /// EINTR, and after EAGAIN (which a kernel that honours O_NONBLOCK in the
    /// ring may return) once the socket is ready.
    async fn repeat(
        &self,
        mut buf: Vec<u8>,
        writable: bool,
        mut make: impl FnMut(Fd, &mut Vec<u8>) -> squeue::Entry,
    ) -> (io::Result<usize>, Vec<u8>) {
        loop {
            let sqe = make(Fd(self.fd.as_raw_fd()), &mut buf);
            let (result, back) = self.run(Some(buf), sqe).await;
            // `run` hands back the buffer it was given.
            buf = back.unwrap_or_default();
            if result == -rustix::io::Errno::INTR.raw_os_error() {
                continue;
            }
            if result == -rustix::io::Errno::AGAIN.raw_os_error() {
                if let Err(e) = self.ready(writable).await {
                    return (Err(e), buf);
                }
                continue;
            }
            let result = if result < 0 {
                Err(io::Error::from_raw_os_error(-result))
            } else {
                Ok(result as usize)
            };
            return (result, buf);
        }
    }

    /// Pushes `sqe` (which uses only `buf`'s memory and this socket) and
    /// waits for its completion.
    async fn run(&self, buf: Option<Vec<u8>>, sqe: squeue::Entry) -> (i32, Option<Vec<u8>>) {
        let op = self.op(buf);
        self.ring.push_op(&op, sqe);
        self.wait(&op).await
    }

    fn op(&self, buf: Option<Vec<u8>>) -> Rc<Op> {
        Rc::new(Op {
            _fd: self.fd.clone(),
            buf: Cell::new(buf),
            result: Cell::new(None),
            waker: Cell::new(None),
        })
    }

    /// Waits for `op`'s completion (cancelling it if the wait is abandoned)
    /// and takes back its buffer.
    async fn wait(&self, op: &Rc<Op>) -> (i32, Option<Vec<u8>>) {
        let waiting = Waiting {
            ring: &self.ring,
            op,
        };
        let result = poll_fn(|cx| match op.result.get() {
            Some(result) => Poll::Ready(result),
            None => {
                op.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await;
        drop(waiting);
        (result, op.buf.take())
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
