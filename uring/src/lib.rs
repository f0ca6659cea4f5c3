//! A proxy thread's io_uring: the L4 byte relay, and [`Socket`]s whose
//! receives and sends a task awaits (the HTTP/1.1 path, `socket.rs`).
//!
//! A relay copies bytes both ways between two connected sockets, passing each
//! side's end of stream on as a half-close, like the proxy's tokio copy loop.
//! It differs in how the work reaches the kernel: every receive and send of
//! every relay on a thread goes into that thread's ring, and one
//! `io_uring_enter` per turn submits them all and reaps the completions,
//! which the kernel runs as task work on this thread when it next enters the
//! kernel (`COOP_TASKRUN`: no interrupt of the thread per completion). One
//! syscall carries a turn's worth of receives and sends, where a
//! recv/send-per-message loop makes four per request and response through
//! the tunnel (the figures are in bench/RESULTS.md).
//!
//! Each proxy thread owns one [`Ring`] (not `Send`) and runs [`Ring::drive`] as
//! a task on its runtime: the ring signals an eventfd the runtime polls.
//!
//! Not `DEFER_TASKRUN`: on some kernels the eventfd signal for its deferred
//! work arrives many milliseconds after the wake-up of a sleeping thread
//! (bench/RESULTS.md, "The rings on Linux 6.18.44"). With `COOP_TASKRUN` this
//! thread posts the completion and signals the eventfd itself, at once (test
//! `a_relay_wakes_at_once_when_a_peer_sends`).
//!
//! Safety rests on one rule: the kernel only ever sees memory and descriptors
//! owned by an `Entry` that stays alive while it can touch them. Every
//! operation in the ring holds a strong reference to its relay's `Entry`
//! (passed as the operation's user data, taken back from its completion), and
//! the `Entry` owns both sockets and both buffers. So a buffer is freed and a
//! descriptor closed (its number free for reuse) only after the last operation
//! on them completed. A relay's sockets are also registered in the ring's file
//! table (operations then name a slot, not a descriptor); its slots are cleared,
//! and only then handed to another relay, once both directions have ended, when
//! no operation can name them. A [`Socket`]'s operation holds the same kind of
//! reference to its own `Op`, which owns the buffer and keeps the descriptor
//! open. A ring dropped with operations still in flight
//! cancels them and reaps what completes within a bound; the rest leak, never
//! free.
#![deny(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

use io_uring::types::{CancelBuilder, Fd, Fixed, SubmitArgs, Timespec};
use io_uring::{opcode, squeue, EnterFlags, IoUring};
use rustix::event::{eventfd, EventfdFlags};
use rustix::net::Shutdown;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

mod socket;
use socket::Op;
pub use socket::Socket;

/// Bytes each direction of a relay reads at a time.
const BUFFER: usize = 16 * 1024;
/// Submission queue entries per ring (the completion queue is twice this;
/// the kernel keeps overflowing completions rather than drop them).
const ENTRIES: u32 = 4096;
/// Most slots in a ring's table of registered sockets (two per relay; also
/// capped by RLIMIT_NOFILE). A relay beyond them uses plain descriptors.
const MAX_SLOTS: u64 = 1 << 16;
/// Failed enters in a row after which the driver retries every 10 ms.
const FAILED_ENTERS_BEFORE_PAUSE: u32 = 100;
/// Completion batches one turn handles before yielding to the thread's other tasks.
const BATCHES_PER_TURN: usize = 8;

/// Tag bits in an operation's user data (an `Entry` and an `Op` are at
/// least 8-aligned). `OP`: a [`Socket`]'s operation, not a relay's; with
/// `SEND` too, the cancellation of one.
const SEND: u64 = 1;
const REVERSE: u64 = 2;
const OP: u64 = 4;
const TAGS: u64 = 7;
/// `IORING_RECVSEND_POLL_FIRST`: a receive waits for data before trying,
/// instead of trying first. Right for a relay: after a direction forwarded a
/// message, its peer's next one is rarely there yet, and the failed try
/// costs a socket receive.
const RECVSEND_POLL_FIRST: u16 = 1;
/// User data of the cancellation a dropped ring submits.
const CANCEL: u64 = 0;

const _: () = assert!(std::mem::align_of::<Entry>() > TAGS as usize);

/// One thread's ring.
pub struct Ring {
    ring: RefCell<IoUring>,
    event: AsyncFd<OwnedFd>,
    /// Operations pushed and not yet completed.
    in_flight: Cell<usize>,
    /// New relays pushed work: the driver submits it on its next turn.
    kicked: Cell<bool>,
    driver: Cell<Option<Waker>>,
    batch: RefCell<Vec<(u64, i32)>>,
    slots: RefCell<Slots>,
    /// `io_uring_enter` calls in a row that failed.
    failed_enters: Cell<u32>,
    /// The last turn woke tasks waiting for [`Socket`] operations.
    woke: Cell<bool>,
}

/// The ring's table of registered sockets, handed out in pairs. An
/// operation on a registered socket skips the kernel's descriptor lookup
/// and its reference count (a shared one, in a process with threads).
struct Slots {
    /// Slots in the table (0: registration failed, plain descriptors only).
    size: u32,
    /// Pairs never handed out start here.
    next: u32,
    free: Vec<u32>,
}

impl Slots {
    fn take(&mut self) -> Option<u32> {
        self.free.pop().or_else(|| {
            let base = self.next;
            (base + 2 <= self.size).then(|| {
                self.next += 2;
                base
            })
        })
    }
}

/// A relay's two directions: 0 is `a → b`, 1 is `b → a`.
struct Entry {
    fds: [OwnedFd; 2],
    dirs: [Direction; 2],
    /// Some bytes moved since the last [`Relay::take_moved`].
    moved: Cell<bool>,
    /// Cut, or one direction failed: nothing more is armed.
    stopped: Cell<bool>,
    /// Directions still running.
    open: Cell<u8>,
    waker: Cell<Option<Waker>>,
    /// `fds[i]` is registered at `slot + i`, cleared when both directions end.
    slot: Option<u32>,
}

struct Direction {
    /// `BUFFER` bytes from `Box::leak`, freed in `Entry::drop`. Only the
    /// kernel reads and writes them; Rust code never makes a reference to them.
    buf: NonNull<u8>,
    len: Cell<usize>,
    sent: Cell<usize>,
}

impl Direction {
    fn new() -> Direction {
        let buf: &mut [u8] = Box::leak(vec![0u8; BUFFER].into_boxed_slice());
        Direction {
            buf: NonNull::from(buf).cast::<u8>(),
            len: Cell::new(0),
            sent: Cell::new(0),
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        for dir in &self.dirs {
            let slice = std::ptr::slice_from_raw_parts_mut(dir.buf.as_ptr(), BUFFER);
            // SAFETY: `buf` came from `Box::leak` of a `BUFFER`-byte boxed
            // slice, and an `Entry` drops only when no operation holds it, so
            // the kernel is done with the buffer.
            #[allow(unsafe_code)]
            drop(unsafe { Box::from_raw(slice) });
        }
    }
}

impl Ring {
    /// A ring for the calling thread, which must be the one that drives it
    /// and starts its relays. Fails where io_uring is missing or forbidden
    /// (kernels before 6.0, seccomp profiles, `kernel.io_uring_disabled`).
    pub fn new() -> io::Result<Rc<Ring>> {
        Ring::with_slots(MAX_SLOTS)
    }

    fn with_slots(max_slots: u64) -> io::Result<Rc<Ring>> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_cqsize(ENTRIES * 2)
            .build(ENTRIES)?;
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        // `None`: no limit.
        let size = (limit.map_or(max_slots, |limit| limit.min(max_slots)) & !1) as u32;
        let size = match ring.submitter().register_files_sparse(size) {
            Ok(()) => size,
            Err(_) => 0,
        };
        let event = eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        // SAFETY: an `OwnedFd` stays open and returns the same descriptor
        // for as long as it lives, and the `AsyncFd` owns it.
        #[allow(unsafe_code)]
        let event = unsafe { AsyncFd::register_with_interest(event, Interest::READABLE)? };
        Ok(Rc::new(Ring {
            ring: RefCell::new(ring),
            event,
            in_flight: Cell::new(0),
            kicked: Cell::new(false),
            driver: Cell::new(None),
            batch: RefCell::new(Vec::new()),
            slots: RefCell::new(Slots {
                size,
                next: 0,
                free: Vec::new(),
            }),
            failed_enters: Cell::new(0),
            woke: Cell::new(false),
        }))
    }

    /// Relays between `a` and `b` until both directions have ended, one
    /// fails, or the returned [`Relay`] is cut or dropped. The ring owns the
    /// sockets from here and closes them when the kernel is done with them.
    pub fn relay(self: &Rc<Self>, a: OwnedFd, b: OwnedFd) -> Relay {
        // The ring waits for readiness itself; a blocking socket keeps it
        // from ever handing back EAGAIN.
        for fd in [&a, &b] {
            let _ = rustix::io::ioctl_fionbio(fd, false);
        }
        // Not one expression: the closure below may borrow `slots` again.
        let base = self.slots.borrow_mut().take();
        let slot = base.and_then(|base| {
            let fds = [a.as_raw_fd(), b.as_raw_fd()];
            match self
                .ring
                .borrow()
                .submitter()
                .register_files_update(base, &fds)
            {
                Ok(2) => Some(base),
                _ => {
                    self.release(base);
                    None
                }
            }
        });
        let entry = Rc::new(Entry {
            slot,
            fds: [a, b],
            dirs: [Direction::new(), Direction::new()],
            moved: Cell::new(false),
            stopped: Cell::new(false),
            open: Cell::new(2),
            waker: Cell::new(None),
        });
        {
            let mut ring = self.ring.borrow_mut();
            self.recv(&mut ring, &entry, 0);
            self.recv(&mut ring, &entry, 1);
        }
        self.kick();
        Relay { entry }
    }

    /// The median time one byte takes through a relay on this ring while
    /// the ring's thread sleeps, over `trips` one-way trips sent from a
    /// helper thread: what a connection waits at each wake-up. About 0.1 ms
    /// where the kernel signals the ring's eventfd at once; 14-20 ms where it
    /// defers the signal (Linux 6.18.44 with DEFER_TASKRUN: bench/RESULTS.md).
    /// The ring must be driven ([`Ring::drive`]) meanwhile.
    pub async fn wake_latency(self: &Rc<Self>, trips: usize) -> io::Result<Duration> {
        use std::io::{Read, Write};
        use std::os::unix::net::UnixStream;
        let (a, mut client) = UnixStream::pair()?;
        let (b, mut server) = UnixStream::pair()?;
        let relay = self.relay(a.into(), b.into());
        let (done, times) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut trip = || -> io::Result<Duration> {
                // Long enough for the ring's thread to go to sleep.
                std::thread::sleep(Duration::from_millis(1));
                let start = std::time::Instant::now();
                client.write_all(b"?")?;
                let mut byte = [0u8; 1];
                server.read_exact(&mut byte)?;
                Ok(start.elapsed())
            };
            let _ = done.send(
                (0..trips.max(1))
                    .map(|_| trip())
                    .collect::<io::Result<Vec<_>>>(),
            );
        });
        // The ring's thread sleeps here until the helper is done.
        let times = times
            .await
            .map_err(|_| io::Error::other("the wake-up probe's thread ended early"));
        drop(relay);
        let mut times = times??;
        times.sort();
        Ok(times[times.len() / 2])
    }

    /// Runs the ring: submits what relays pushed and handles completions,
    /// for as long as the thread runs. Spawn it once per ring.
    pub async fn drive(self: Rc<Self>) {
        loop {
            if self.turn() {
                if self.failed_enters.get() >= FAILED_ENTERS_BEFORE_PAUSE {
                    // An error that does not go away: retry at a slow pace
                    // instead of spinning on the thread.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                } else if self.woke.replace(false) {
                    // Tasks were woken: they run now and push their next
                    // operations, and the next turn's one enter submits
                    // them and runs what the kernel may have kept back.
                    requeue().await;
                } else {
                    tokio::task::yield_now().await;
                }
                continue;
            }
            poll_fn(|cx| {
                if self.kicked.replace(false) {
                    return Poll::Ready(());
                }
                self.driver.set(Some(cx.waker().clone()));
                match self.event.poll_read_ready(cx) {
                    Poll::Ready(Ok(mut ready)) => {
                        // The counter is not read back: epoll reports every
                        // signal of an eventfd as a new edge, whatever its
                        // count (which cannot come near overflowing), so
                        // clearing tokio's readiness is enough, and a read
                        // per wake-up is saved.
                        ready.clear_ready();
                        Poll::Ready(())
                    }
                    // Not expected of an eventfd; the turn finds out if
                    // anything is waiting.
                    Poll::Ready(Err(_)) => Poll::Ready(()),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
        }
    }

    /// Submits, reaps completions and handles them, up to
    /// `BATCHES_PER_TURN` times, or once when the completions woke
    /// [`Socket`] tasks (`woke`). True if work may be left.
    fn turn(&self) -> bool {
        let mut batch = self.batch.borrow_mut();
        for _ in 0..BATCHES_PER_TURN {
            let mut ring = self.ring.borrow_mut();
            let entered = enter(&mut ring);
            match entered {
                Ok(_) => self.failed_enters.set(0),
                Err(_) => self
                    .failed_enters
                    .set(self.failed_enters.get().saturating_add(1)),
            }
            batch.clear();
            batch.extend(ring.completion().map(|cqe| (cqe.user_data(), cqe.result())));
            if batch.is_empty() {
                // A failed enter (EINTR, say) may have left completions
                // that will not signal the eventfd again: another turn.
                return entered.is_err();
            }
            let mut woke = false;
            for &(data, result) in batch.iter() {
                if data == CANCEL {
                    continue;
                }
                woke |= data & OP != 0;
                self.in_flight.set(self.in_flight.get() - 1);
                self.complete(&mut ring, data, result);
            }
            if woke {
                self.woke.set(true);
                return true;
            }
        }
        true
    }

    fn complete(&self, ring: &mut IoUring, data: u64, result: i32) {
        if data & OP != 0 {
            let op = reclaim_op(data);
            if data & SEND != 0 {
                // A cancellation's own completion. One that found nothing
                // may have run before the kernel took the operation up (both
                // came in one enter): while it has not completed, again.
                // Seen here with a MSG_WAITALL send that had to wait; the
                // receives and sends made now are taken up at once.
                let missed = result == -rustix::io::Errno::NOENT.raw_os_error();
                if missed && !op.is_complete() {
                    self.cancel_in(ring, &op);
                }
                return;
            }
            op.complete(result);
            return;
        }
        let entry = reclaim(data);
        let dir = usize::from(data & REVERSE != 0);
        let retry = [rustix::io::Errno::INTR, rustix::io::Errno::AGAIN];
        if retry.iter().any(|errno| result == -errno.raw_os_error()) {
            if data & SEND != 0 {
                self.send(ring, &entry, dir);
            } else {
                self.recv(ring, &entry, dir);
            }
            return;
        }
        if result < 0 {
            entry.fail();
            self.end(ring, &entry);
            return;
        }
        let d = &entry.dirs[dir];
        let n = result as usize;
        if data & SEND == 0 {
            if n == 0 {
                // End of stream: pass it on as a half-close.
                let _ = rustix::net::shutdown(entry.fds[1 - dir].as_fd(), Shutdown::Write);
                self.end(ring, &entry);
                return;
            }
            entry.moved.set(true);
            d.len.set(n);
            d.sent.set(0);
        } else {
            d.sent.set(d.sent.get() + n);
        }
        if entry.stopped.get() {
            self.end(ring, &entry);
        } else if d.sent.get() < d.len.get() {
            self.send(ring, &entry, dir);
        } else {
            self.recv(ring, &entry, dir);
        }
    }

    /// One direction is over; when both are, nothing of the relay is in
    /// the ring any more: its slots are cleared and its task woken.
    fn end(&self, ring: &IoUring, entry: &Entry) {
        let open = entry.open.get() - 1;
        entry.open.set(open);
        if open > 0 {
            return;
        }
        if let Some(base) = entry.slot {
            let cleared = ring.submitter().register_files_update(base, &[-1, -1]);
            // A pair the kernel did not clear is never handed out again.
            if cleared.is_ok() {
                self.release(base);
            }
        }
        if let Some(waker) = entry.waker.take() {
            waker.wake();
        }
    }

    fn release(&self, base: u32) {
        self.slots.borrow_mut().free.push(base);
    }

    fn recv(&self, ring: &mut IoUring, entry: &Rc<Entry>, dir: usize) {
        let (buf, len) = (entry.dirs[dir].buf.as_ptr(), BUFFER as u32);
        let op = match entry.slot {
            Some(base) => opcode::Recv::new(Fixed(base + dir as u32), buf, len),
            None => opcode::Recv::new(Fd(entry.fds[dir].as_raw_fd()), buf, len),
        };
        self.push(ring, entry, dir, 0, op.ioprio(RECVSEND_POLL_FIRST).build());
    }

    fn send(&self, ring: &mut IoUring, entry: &Rc<Entry>, dir: usize) {
        let d = &entry.dirs[dir];
        let (sent, len) = (d.sent.get(), d.len.get());
        // `sent < len <= BUFFER`: the bytes a receive of this direction left.
        let start = d.buf.as_ptr().wrapping_add(sent);
        let len = (len - sent) as u32;
        let to = 1 - dir;
        let op = match entry.slot {
            Some(base) => opcode::Send::new(Fixed(base + to as u32), start, len),
            None => opcode::Send::new(Fd(entry.fds[to].as_raw_fd()), start, len),
        };
        let op = op.flags(rustix::net::SendFlags::NOSIGNAL.bits() as i32);
        self.push(ring, entry, dir, SEND, op.build());
    }

    fn push(&self, ring: &mut IoUring, entry: &Rc<Entry>, dir: usize, tag: u64, op: squeue::Entry) {
        let reverse = if dir == 1 { REVERSE } else { 0 };
        let data = Rc::into_raw(entry.clone()) as u64 | tag | reverse;
        // SAFETY: the operation reads or writes only the `Entry`'s own
        // buffer and sockets, and carries a strong reference to the `Entry`
        // (`data`) that only its completion gives back, so both outlive it.
        #[allow(unsafe_code)]
        unsafe {
            push_raw(ring, &op.user_data(data))
        };
        self.in_flight.set(self.in_flight.get() + 1);
    }

    /// Queues a [`Socket`]'s operation, which uses only `op`'s buffer and
    /// descriptor, and has the driver submit it.
    fn push_op(&self, op: &Rc<Op>, sqe: squeue::Entry) {
        let data = Rc::into_raw(op.clone()) as u64 | OP;
        debug_assert_eq!(data, op.data());
        // SAFETY: the operation reads or writes only the buffer and the
        // descriptor `op` owns, and carries a strong reference to `op`
        // (`data`) that only its completion gives back, so both outlive it.
        #[allow(unsafe_code)]
        unsafe {
            push_raw(&mut self.ring.borrow_mut(), &sqe.user_data(data))
        };
        self.in_flight.set(self.in_flight.get() + 1);
        self.kick();
    }

    /// Asks the kernel to cancel `op`; its completion still comes (with
    /// ECANCELED if the cancellation won).
    fn cancel(&self, op: &Rc<Op>) {
        self.cancel_in(&mut self.ring.borrow_mut(), op);
    }

    fn cancel_in(&self, ring: &mut IoUring, op: &Rc<Op>) {
        // The cancellation holds a reference to `op` too (OP | SEND), so
        // its completion can look at it.
        let data = Rc::into_raw(op.clone()) as u64 | OP | SEND;
        let cancel = opcode::AsyncCancel::new(op.data()).build().user_data(data);
        // SAFETY: a cancellation touches no memory of ours.
        #[allow(unsafe_code)]
        unsafe {
            push_raw(ring, &cancel)
        };
        self.in_flight.set(self.in_flight.get() + 1);
        self.kick();
    }

    /// Has the driver submit on its next turn.
    fn kick(&self) {
        self.kicked.set(true);
        if let Some(driver) = self.driver.take() {
            driver.wake();
        }
    }
}

/// Pushes `sqe`, handing a full queue to the kernel first.
///
/// # Safety
/// Whatever memory and descriptors `sqe` names must stay valid until its
/// completion.
#[allow(unsafe_code)]
unsafe fn push_raw(ring: &mut IoUring, sqe: &squeue::Entry) {
    loop {
        // SAFETY: the caller's promise.
        if unsafe { ring.submission().push(sqe) }.is_ok() {
            return;
        }
        if ring.submit().is_err() {
            std::thread::yield_now();
        }
    }
}

/// Lets the tasks the runtime has ready run, then resumes: the task wakes
/// itself and goes to the back of the thread's run queue (tokio's
/// `yield_now` waits for the reactor's next poll instead, a syscall).
async fn requeue() {
    let mut queued = false;
    poll_fn(|cx| {
        if queued {
            return Poll::Ready(());
        }
        queued = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// The reference to its `Entry` that a completed operation held (the user
/// data of any completion but CANCEL's).
fn reclaim(data: u64) -> Rc<Entry> {
    debug_assert_eq!(data & OP, 0);
    // SAFETY: every user data other than CANCEL and without the OP tag is an
    // `Rc::into_raw` of an `Entry` with tag bits or-ed into its alignment
    // bits (see `push`), and each operation completes once, so this takes
    // back exactly the reference that operation held.
    #[allow(unsafe_code)]
    unsafe {
        Rc::from_raw((data & !TAGS) as *const Entry)
    }
}

/// The reference to its `Op` that a completed [`Socket`] operation held (the
/// user data of a completion with the OP tag).
fn reclaim_op(data: u64) -> Rc<Op> {
    // SAFETY: user data with the OP tag is an `Rc::into_raw` of an `Op`
    // or-ed with OP in its alignment bits (see `push_op`), and each
    // operation completes once, so this takes back exactly its reference.
    #[allow(unsafe_code)]
    unsafe {
        Rc::from_raw((data & !TAGS) as *const Op)
    }
}

/// Submits what is queued and runs the task work (completions) waiting for
/// this thread. Always with GETEVENTS: it also flushes completions that
/// overflowed the queue, and costs nothing when there is none.
fn enter(ring: &mut IoUring) -> io::Result<usize> {
    let queued = ring.submission().len() as u32;
    // SAFETY: no argument is passed (no sigmask, no timeout), and the queued
    // entries were made valid by `push`.
    #[allow(unsafe_code)]
    unsafe {
        ring.submitter()
            .enter::<()>(queued, 0, EnterFlags::GETEVENTS.bits(), None)
    }
}

impl Drop for Ring {
    /// Cancels the operations still in flight and reaps them for up to a
    /// second; references they still hold then leak (with their buffers and
    /// sockets) rather than free memory the kernel may still write.
    fn drop(&mut self) {
        let ring = self.ring.get_mut();
        if self.in_flight.get() == 0 {
            return;
        }
        let cancel = opcode::AsyncCancel2::new(CancelBuilder::any())
            .build()
            .user_data(CANCEL);
        // SAFETY: a cancellation touches no memory of ours.
        #[allow(unsafe_code)]
        let _ = unsafe { ring.submission().push(&cancel) };
        let timeout = Timespec::from(Duration::from_millis(50));
        for _ in 0..20 {
            let args = SubmitArgs::new().timespec(&timeout);
            let _ = ring.submitter().submit_with_args(1, &args);
            let done: Vec<u64> = ring.completion().map(|cqe| cqe.user_data()).collect();
            for data in done {
                if data == CANCEL {
                    continue;
                }
                self.in_flight.set(self.in_flight.get() - 1);
                if data & OP != 0 {
                    drop(reclaim_op(data));
                } else {
                    drop(reclaim(data));
                }
            }
            if self.in_flight.get() == 0 {
                return;
            }
        }
    }
}

impl Entry {
    fn fail(&self) {
        if !self.stopped.replace(true) {
            for fd in &self.fds {
                let _ = rustix::net::shutdown(fd.as_fd(), Shutdown::Both);
            }
        }
    }
}

/// A running relay.
pub struct Relay {
    entry: Rc<Entry>,
}

impl Relay {
    /// Resolves when both directions have ended (or failed, or were cut).
    pub async fn finished(&self) {
        poll_fn(|cx| {
            if self.entry.open.get() == 0 {
                Poll::Ready(())
            } else {
                self.entry.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }

    /// True if bytes moved since the last call.
    pub fn take_moved(&self) -> bool {
        self.entry.moved.replace(false)
    }

    /// Shuts both sockets down: pending receives end, nothing more is sent.
    pub fn cut(&self) {
        self.entry.fail();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if self.entry.open.get() > 0 {
            self.cut();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connected pair of sockets on 127.0.0.1: (ours, the peer's).
    fn pair() -> (TcpStream, tokio::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let near = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (far, _) = listener.accept().expect("accept");
        far.set_nonblocking(true).expect("nonblocking");
        near.set_nonblocking(true).expect("nonblocking");
        (
            near,
            tokio::net::TcpStream::from_std(far).expect("tokio stream"),
        )
    }

    fn ring(slots: u64) -> Rc<Ring> {
        Ring::with_slots(slots).unwrap_or_else(|e| {
            panic!("io_uring is unavailable here ({e}); these tests need Linux ≥ 6.0 with io_uring enabled")
        })
    }

    /// Runs `test` on a current-thread runtime with a driven ring.
    fn with_ring<F: std::future::Future<Output = ()>>(test: impl FnOnce(Rc<Ring>) -> F) {
        with_ring_of(MAX_SLOTS, test)
    }

    /// `with_ring`, with at most `slots` registered sockets.
    fn with_ring_of<F: std::future::Future<Output = ()>>(
        slots: u64,
        test: impl FnOnce(Rc<Ring>) -> F,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let tasks = tokio::task::LocalSet::new();
        tasks.block_on(&runtime, async {
            let ring = ring(slots);
            tokio::task::spawn_local(ring.clone().drive());
            tokio::time::timeout(Duration::from_secs(20), test(ring))
                .await
                .expect("test timed out");
        });
    }

    #[test]
    fn relays_both_ways_byte_exact_and_passes_half_closes_on() {
        with_ring(|ring| async move {
            let (a, mut client) = pair();
            let (b, mut server) = pair();
            let relay = ring.relay(a.into(), b.into());
            // 3 MiB up, 1 MiB down, concurrently, with bytes that differ by position.
            let up: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
            let down: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 241) as u8).collect();
            let (mut client_read, mut client_write) = client.split();
            let (mut server_read, mut server_write) = server.split();
            let (got_up, got_down, _, _) = tokio::join!(
                async {
                    let mut got = Vec::new();
                    server_read
                        .read_to_end(&mut got)
                        .await
                        .expect("server read");
                    got
                },
                async {
                    let mut got = Vec::new();
                    client_read
                        .read_to_end(&mut got)
                        .await
                        .expect("client read");
                    got
                },
                async {
                    client_write.write_all(&up).await.expect("client write");
                    // The server sees end of stream only through the relay's half-close.
                    client_write.shutdown().await.expect("client shutdown");
                },
                async {
                    server_write.write_all(&down).await.expect("server write");
                    server_write.shutdown().await.expect("server shutdown");
                },
            );
            assert!(
                got_up == up,
                "upstream got {} bytes, not the {} sent",
                got_up.len(),
                up.len()
            );
            assert!(
                got_down == down,
                "client got {} bytes, not the {} sent",
                got_down.len(),
                down.len()
            );
            relay.finished().await;
            assert!(relay.take_moved());
            assert!(!relay.take_moved(), "take_moved resets");
        });
    }

    /// Not a speed test: a liveness one. A ring whose thread sleeps must
    /// learn of a completed receive from its eventfd at once. On Linux
    /// 6.18.44 a `DEFER_TASKRUN` ring's eventfd was signalled 14–20 ms
    /// late, which took W-http and W-tcp from ~55k to ~2k
    /// requests/s with every functional test still green. Each one-way trip
    /// here starts while the ring's thread sleeps: about 0.1 ms when the
    /// signal is prompt, about 14 ms when it is deferred. The median of 42 is
    /// compared to 10 ms, so a stray slow wake-up on a loaded machine does
    /// not decide it.
    #[test]
    fn a_relay_wakes_at_once_when_a_peer_sends() {
        with_ring(|ring| async move {
            let (a, client) = pair();
            let (b, server) = pair();
            let relay = ring.relay(a.into(), b.into());
            // The peers run on a thread of their own, as clients and
            // backends do: the ring's thread sleeps in epoll until the
            // eventfd wakes it.
            let (mut client, mut server) = (blocking(client), blocking(server));
            let peers = std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut byte = [0u8; 1];
                let mut trips = Vec::new();
                for _ in 0..21 {
                    // Long enough for the ring's thread to go to sleep.
                    std::thread::sleep(Duration::from_millis(2));
                    let start = Instant::now();
                    client.write_all(b"?").expect("client write");
                    server.read_exact(&mut byte).expect("server read");
                    trips.push(start.elapsed());
                    std::thread::sleep(Duration::from_millis(2));
                    let start = Instant::now();
                    server.write_all(b"!").expect("server write");
                    client.read_exact(&mut byte).expect("client read");
                    trips.push(start.elapsed());
                }
                trips
            });
            while !peers.is_finished() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let mut trips = peers.join().expect("peers");
            trips.sort();
            let median = trips[trips.len() / 2];
            assert!(
                median < Duration::from_millis(10),
                "the median trip through the ring took {median:?} (all: {trips:?}): \
                 its eventfd is not signalled when a completion waits"
            );
            drop(relay);
        });
    }

    #[test]
    fn the_wake_up_probe_measures_a_prompt_ring_as_prompt() {
        with_ring(|ring| async move {
            let median = ring.wake_latency(9).await.expect("probe");
            assert!(
                median < Duration::from_millis(10),
                "a COOP_TASKRUN ring woke after {median:?}"
            );
        });
    }

    /// A peer's tokio stream back as a blocking std stream.
    fn blocking(stream: tokio::net::TcpStream) -> TcpStream {
        let stream = stream.into_std().expect("std stream");
        stream.set_nonblocking(false).expect("blocking");
        stream
    }

    #[test]
    fn one_half_close_leaves_the_other_direction_open() {
        with_ring(|ring| async move {
            let (a, mut client) = pair();
            let (b, mut server) = pair();
            let relay = ring.relay(a.into(), b.into());
            client.write_all(b"request").await.expect("write");
            client.shutdown().await.expect("shutdown");
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.expect("read");
            assert_eq!(got, b"request");
            // The server answers after the client's half-close.
            server.write_all(b"response").await.expect("write");
            drop(server);
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.expect("read");
            assert_eq!(got, b"response");
            relay.finished().await;
        });
    }

    #[test]
    fn a_cut_ends_an_idle_relay_and_both_peers_see_it() {
        with_ring(|ring| async move {
            let (a, mut client) = pair();
            let (b, mut server) = pair();
            let relay = ring.relay(a.into(), b.into());
            client.write_all(b"x").await.expect("write");
            let mut one = [0u8; 1];
            server.read_exact(&mut one).await.expect("read");
            relay.cut();
            relay.finished().await;
            let mut rest = Vec::new();
            // EOF (or a reset) on both sides, not a hang.
            let _ = client.read_to_end(&mut rest).await;
            let _ = server.read_to_end(&mut rest).await;
            assert!(rest.is_empty());
        });
    }

    #[test]
    fn dropping_a_relay_cuts_it_and_closes_its_sockets() {
        with_ring(|ring| async move {
            let (a, mut client) = pair();
            let (b, mut server) = pair();
            drop(ring.relay(a.into(), b.into()));
            let mut rest = Vec::new();
            let _ = client.read_to_end(&mut rest).await;
            let _ = server.read_to_end(&mut rest).await;
            // Once the pending receives completed, the ring dropped the last
            // references: nothing is left in flight.
            settled(&ring).await;
        });
    }

    #[test]
    fn a_peer_reset_fails_the_relay_and_ends_the_other_side() {
        with_ring(|ring| async move {
            let (a, client) = pair();
            let (b, mut server) = pair();
            let relay = ring.relay(a.into(), b.into());
            // Closing with unread data or SO_LINGER 0 sends RST.
            let client = client.into_std().expect("std");
            socket_linger_zero(&client);
            drop(client);
            relay.finished().await;
            let mut rest = Vec::new();
            let _ = server.read_to_end(&mut rest).await;
            assert!(rest.is_empty());
        });
    }

    fn socket_linger_zero(stream: &TcpStream) {
        rustix::net::sockopt::set_socket_linger(stream, Some(Duration::ZERO)).expect("SO_LINGER");
    }

    /// Sends `msg` from `from` and reads it at `to`.
    async fn carries(from: &mut tokio::net::TcpStream, to: &mut tokio::net::TcpStream, msg: &[u8]) {
        from.write_all(msg).await.expect("write");
        let mut got = vec![0u8; msg.len()];
        to.read_exact(&mut got).await.expect("read");
        assert_eq!(got, msg);
    }

    #[test]
    fn registered_slots_are_reused_and_relays_beyond_them_use_plain_descriptors() {
        // One pair of slots.
        with_ring_of(2, |ring| async move {
            let (a1, mut c1) = pair();
            let (b1, mut s1) = pair();
            let first = ring.relay(a1.into(), b1.into());
            let (a2, mut c2) = pair();
            let (b2, mut s2) = pair();
            let second = ring.relay(a2.into(), b2.into());
            assert_eq!(first.entry.slot, Some(0));
            assert_eq!(second.entry.slot, None, "the table is full");
            carries(&mut c1, &mut s1, b"registered").await;
            carries(&mut s1, &mut c1, b"both ways").await;
            carries(&mut c2, &mut s2, b"plain").await;
            carries(&mut s2, &mut c2, b"both ways").await;
            drop((c1, s1));
            first.finished().await;
            let (a3, mut c3) = pair();
            let (b3, mut s3) = pair();
            let third = ring.relay(a3.into(), b3.into());
            assert_eq!(
                third.entry.slot,
                Some(0),
                "the ended relay's pair is free again"
            );
            carries(&mut c3, &mut s3, b"reused").await;
            carries(&mut s3, &mut c3, b"both ways").await;
        });
    }

    #[test]
    fn many_relays_at_once() {
        with_ring(|ring| async move {
            let mut clients = Vec::new();
            let mut servers = Vec::new();
            let mut relays = Vec::new();
            for _ in 0..200 {
                let (a, client) = pair();
                let (b, server) = pair();
                relays.push(ring.relay(a.into(), b.into()));
                clients.push(client);
                servers.push(server);
            }
            for round in 0..20u8 {
                for client in &mut clients {
                    client.write_all(&[round; 100]).await.expect("write");
                }
                for server in &mut servers {
                    let mut got = [0u8; 100];
                    server.read_exact(&mut got).await.expect("read");
                    assert_eq!(got, [round; 100]);
                    server.write_all(&got).await.expect("write");
                }
                for client in &mut clients {
                    let mut got = [0u8; 100];
                    client.read_exact(&mut got).await.expect("read");
                    assert_eq!(got, [round; 100]);
                }
            }
            drop(clients);
            drop(servers);
            for relay in &relays {
                relay.finished().await;
            }
        });
    }

    /// Waits until the ring has no operation in flight.
    async fn settled(ring: &Ring) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while ring.in_flight.get() > 0 {
            assert!(
                Instant::now() < deadline,
                "{} operations still in flight",
                ring.in_flight.get()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn a_socket_receives_and_sends_through_the_ring_and_sees_end_of_stream() {
        with_ring(|ring| async move {
            let (near, mut far) = pair();
            let socket = Socket::new(&ring, near.into());
            // 1 MiB each way, in pieces, with bytes that differ by position.
            let up: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
            let sent = up.clone();
            let peer = tokio::task::spawn_local(async move {
                far.write_all(&sent).await.expect("peer write");
                let mut got = vec![0u8; 1 << 20];
                far.read_exact(&mut got).await.expect("peer read");
                far.shutdown().await.expect("peer shutdown");
                got
            });
            let mut got = Vec::new();
            let mut buf = vec![0u8; 16 * 1024];
            while got.len() < up.len() {
                let (n, back) = socket.recv(buf, 100..16 * 1024).await;
                buf = back;
                let n = n.expect("recv");
                assert!(n > 0, "end of stream after {} bytes", got.len());
                got.extend_from_slice(&buf[100..100 + n]);
            }
            assert!(got == up, "received bytes differ from the sent ones");
            let (sent, _) = socket.send_all(got, 0..1 << 20, false).await;
            sent.expect("send");
            let echoed = peer.await.expect("peer");
            assert!(echoed == up, "the peer got different bytes back");
            let (n, _) = socket.recv(buf, 0..16 * 1024).await;
            assert_eq!(n.expect("recv at the end"), 0, "end of stream reads 0");
            settled(&ring).await;
        });
    }

    #[test]
    fn an_abandoned_receive_is_cancelled_and_the_socket_still_works() {
        with_ring(|ring| async move {
            let (near, mut far) = pair();
            let socket = Socket::new(&ring, near.into());
            let waited =
                tokio::time::timeout(Duration::from_millis(50), socket.recv(vec![0; 64], 0..64))
                    .await;
            assert!(waited.is_err(), "nothing was sent, yet the receive ended");
            settled(&ring).await;
            far.write_all(b"later").await.expect("write");
            let (n, buf) = socket.recv(vec![0; 64], 0..64).await;
            assert_eq!(&buf[..n.expect("recv")], b"later");
            // No operation holds the descriptor: it comes back as it came, nonblocking.
            let fd = socket.into_fd().ok().expect("the descriptor is free");
            let flags = rustix::fs::fcntl_getfl(&fd).expect("flags");
            assert!(flags.contains(rustix::fs::OFlags::NONBLOCK));
            drop(fd);
            let mut rest = Vec::new();
            far.read_to_end(&mut rest).await.expect("end of stream");
            assert!(rest.is_empty());
        });
    }

    #[test]
    fn a_socket_waits_for_readiness_and_rejects_ranges_outside_its_buffer() {
        with_ring(|ring| async move {
            let (near, mut far) = pair();
            let socket = Socket::new(&ring, near.into());
            let ready = tokio::time::timeout(Duration::from_millis(50), socket.ready(false)).await;
            assert!(ready.is_err(), "readable with nothing sent");
            far.write_all(b"x").await.expect("write");
            socket.ready(false).await.expect("readable");
            socket.ready(true).await.expect("writable");
            let (sent, _) = socket.send(vec![0; 4], 2..8, false).await;
            assert!(sent.is_err());
            let (got, _) = socket.recv(vec![0; 4], 4..4).await;
            assert!(got.is_err());
            settled(&ring).await;
        });
    }

    #[test]
    fn operations_abandoned_before_the_ring_took_them_up_are_cancelled() {
        with_ring(|ring| async move {
            let (near, mut far) = pair();
            rustix::net::sockopt::set_socket_send_buffer_size(&near, 8192).expect("SO_SNDBUF");
            let socket = Socket::new(&ring, near.into());
            let big = vec![7u8; 32 << 20];
            // Polled once (pushed) and dropped before the driver ran: each
            // operation and its cancellation reach the kernel in one enter.
            for _ in 0..50 {
                let mut recv = std::pin::pin!(socket.recv(vec![0; 64], 0..64));
                let polled =
                    poll_fn(|cx| Poll::Ready(std::future::Future::poll(recv.as_mut(), cx))).await;
                assert!(polled.is_pending(), "a receive finished with nothing sent");
            }
            {
                let mut send = std::pin::pin!(socket.send(big, 0..32 << 20, false));
                let polled =
                    poll_fn(|cx| Poll::Ready(std::future::Future::poll(send.as_mut(), cx))).await;
                assert!(polled.is_pending(), "32 MiB went out with nobody reading");
            }
            settled(&ring).await;
            // None of the receives took the bytes sent afterwards.
            far.write_all(b"after").await.expect("write");
            let (n, buf) = socket.recv(vec![0; 64], 0..64).await;
            assert_eq!(&buf[..n.expect("recv")], b"after");
        });
    }
}
