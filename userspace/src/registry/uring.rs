//! File bodies through io_uring: `splice(file → pipe)` linked to
//! `splice(pipe → socket)` linked to a timeout, so the bytes never enter
//! userspace and one submission moves a pipe-full of data.
//!
//! One reactor thread owns the ring (tokio cannot drive io_uring
//! completions, and tokio-uring cannot drive tokio's sockets). Transfers are
//! handed to it over a channel and an eventfd that a standing read in the
//! ring watches; each transfer's future waits on a oneshot.
//!
//! Safety of file descriptors: the reactor works on `dup`ed descriptors it
//! owns until the last operation that names them has completed, so a client
//! connection dropped mid-transfer can never make the ring touch a reused
//! descriptor number. Every socket operation carries a linked timeout, so a
//! client that stops reading frees its transfer after the write timeout, and
//! the kernel's io-wq worker pool that runs the splices is capped.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use io_uring::{IoUring, opcode, squeue, types};
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// Bytes moved per round (and the pipe's capacity).
const PIPE_SIZE: usize = 1 << 20;
/// Ring size: room for many chains of three entries.
const RING_ENTRIES: u32 = 256;
/// Kernel workers that may run splices at once (bounded, unbounded).
const IOWQ_MAX_WORKERS: [u32; 2] = [4, 16];
/// Idle pipes kept for reuse.
const PIPE_POOL: usize = 32;

const EVENTFD_TOKEN: u64 = u64::MAX;

/// One transfer handed to the reactor.
struct Job {
    file: OwnedFd,
    socket: OwnedFd,
    offset: u64,
    len: u64,
    timeout: Duration,
    counter: Counter,
    reply: oneshot::Sender<io::Result<()>>,
}

/// The io_uring serving engine. Cheap to clone; the reactor thread ends when
/// the last handle is dropped.
#[derive(Clone)]
pub struct Uring {
    inner: Arc<Inner>,
}

struct Inner {
    jobs: Mutex<mpsc::Sender<Job>>,
    wake: OwnedFd,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel (when `jobs` drops) and waking the reactor
        // lets it finish what is in flight and exit.
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }
}

impl Uring {
    /// Sets up the ring and its reactor thread, and checks that splices
    /// through it work here (kernels can disable io_uring). Blocks: call it
    /// outside async code (e.g. in `spawn_blocking`).
    pub fn new() -> io::Result<Uring> {
        let ring: IoUring = IoUring::builder().setup_clamp().build(RING_ENTRIES)?;
        let mut max = IOWQ_MAX_WORKERS;
        ring.submitter().register_iowq_max_workers(&mut max)?;
        let wake = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)?;
        let wake_reactor = wake.try_clone()?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("peermirror-uring".into())
            .spawn(move || Reactor::new(ring, wake_reactor, rx).run())?;
        let uring = Uring {
            inner: Arc::new(Inner {
                jobs: Mutex::new(tx),
                wake,
            }),
        };
        uring.self_test()?;
        Ok(uring)
    }

    /// Sends `len` bytes of `file` from `offset` to `socket`.
    pub async fn send(
        &self,
        file: &File,
        socket: &TcpStream,
        offset: u64,
        len: u64,
        timeout: Duration,
        counter: &Counter,
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        // The splices run as blocking work on io-wq workers: the socket is
        // made blocking for the transfer (the connection task does not touch
        // it meanwhile) and non-blocking again afterwards, whatever happens.
        let _blocking = BlockingGuard::new(socket)?;
        let (reply, done) = oneshot::channel();
        let job = Job {
            file: file.as_fd().try_clone_to_owned()?,
            socket: socket.as_fd().try_clone_to_owned()?,
            offset,
            len,
            timeout,
            counter: counter.clone(),
            reply,
        };
        self.inner
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job)
            .map_err(|_| io::Error::other("io_uring reactor has stopped"))?;
        rustix::io::write(&self.inner.wake, &1u64.to_ne_bytes())?;
        done.await
            .map_err(|_| io::Error::other("io_uring reactor has stopped"))?
    }

    /// Splices a small file to a socket pair through the ring.
    fn self_test(&self) -> io::Result<()> {
        let mut file = tempfile_in_dev_shm()?;
        let payload: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        io::Write::write_all(&mut file, &payload)?;
        let (a, b) = std::os::unix::net::UnixStream::pair()?;
        b.set_nonblocking(false)?;
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let _ = io::Read::read_to_end(&mut &b, &mut got);
            got
        });
        let socket_fd: OwnedFd = a.into();
        let (reply, done) = oneshot::channel();
        let job = Job {
            file: file.as_fd().try_clone_to_owned()?,
            socket: socket_fd,
            offset: 0,
            len: payload.len() as u64,
            timeout: Duration::from_secs(5),
            counter: Counter::default(),
            reply,
        };
        self.inner
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job)
            .map_err(|_| io::Error::other("io_uring reactor has stopped"))?;
        rustix::io::write(&self.inner.wake, &1u64.to_ne_bytes())?;
        done.blocking_recv()
            .map_err(|_| io::Error::other("no answer from the io_uring reactor"))??;
        let got = reader
            .join()
            .map_err(|_| io::Error::other("reader panicked"))?;
        if got != payload {
            return Err(io::Error::other(
                "io_uring splice self-test delivered other bytes",
            ));
        }
        Ok(())
    }
}

/// Clears `O_NONBLOCK` on a socket until dropped.
struct BlockingGuard<'a> {
    socket: &'a TcpStream,
    flags: rustix::fs::OFlags,
}

impl<'a> BlockingGuard<'a> {
    fn new(socket: &'a TcpStream) -> io::Result<Self> {
        let flags = rustix::fs::fcntl_getfl(socket)?;
        rustix::fs::fcntl_setfl(socket, flags - rustix::fs::OFlags::NONBLOCK)?;
        Ok(BlockingGuard { socket, flags })
    }
}

impl Drop for BlockingGuard<'_> {
    fn drop(&mut self) {
        let _ = rustix::fs::fcntl_setfl(self.socket, self.flags);
    }
}

fn tempfile_in_dev_shm() -> io::Result<File> {
    // An unnamed file that vanishes when closed.
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    let fd = rustix::fs::open(
        dir,
        rustix::fs::OFlags::TMPFILE | rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::from_raw_mode(0o600),
    )?;
    Ok(File::from(fd))
}

/// What a transfer waits for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// splice in → splice out → timeout (3 completions).
    Full,
    /// splice out → timeout, to empty the pipe (2 completions).
    Drain,
}

struct Transfer {
    job: Job,
    pipe_r: OwnedFd,
    pipe_w: OwnedFd,
    pos: u64,
    end: u64,
    in_pipe: u64,
    stage: Stage,
    outstanding: u8,
    /// Results of the round in flight.
    r_in: Option<i32>,
    r_out: Option<i32>,
    timed_out: bool,
    /// Kept at a stable address while the kernel may read it.
    timespec: Box<types::Timespec>,
}

struct Reactor {
    ring: IoUring,
    wake: OwnedFd,
    wake_buf: Box<[u8; 8]>,
    jobs: mpsc::Receiver<Job>,
    transfers: HashMap<u64, Transfer>,
    next_id: u64,
    pipes: Vec<(OwnedFd, OwnedFd)>,
    closed: bool,
}

/// user_data: transfer id in the high bits, operation in the low two.
const OP_IN: u64 = 0;
const OP_OUT: u64 = 1;
const OP_TIMEOUT: u64 = 2;

fn errno(res: i32) -> io::Error {
    io::Error::from_raw_os_error(-res)
}

impl Reactor {
    fn new(ring: IoUring, wake: OwnedFd, jobs: mpsc::Receiver<Job>) -> Reactor {
        Reactor {
            ring,
            wake,
            wake_buf: Box::new([0; 8]),
            jobs,
            transfers: HashMap::new(),
            next_id: 1,
            pipes: Vec::new(),
            closed: false,
        }
    }

    fn arm_wake(&mut self) {
        let read = opcode::Read::new(
            types::Fd(self.wake.as_raw_fd()),
            self.wake_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(EVENTFD_TOKEN);
        self.push(&[read]);
    }

    /// Pushes entries, submitting first when the queue is full.
    fn push(&mut self, entries: &[squeue::Entry]) {
        loop {
            // SAFETY: every pointer in the entries (buffers, timespecs) lives
            // in the reactor or in a transfer until its completion is reaped.
            let pushed = unsafe { self.ring.submission().push_multiple(entries) };
            if pushed.is_ok() {
                return;
            }
            let _ = self.ring.submit();
        }
    }

    fn run(mut self) {
        self.arm_wake();
        loop {
            if self.closed && self.transfers.is_empty() {
                return;
            }
            if let Err(e) = self.ring.submit_and_wait(1)
                && e.raw_os_error() != Some(libc::EINTR)
            {
                tracing::error!(error = %e, "io_uring submit failed; stopping the io_uring serving path");
                for (_, t) in self.transfers.drain() {
                    let _ = t.job.reply.send(Err(io::Error::other("io_uring failed")));
                }
                return;
            }
            let completions: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (data, res) in completions {
                if data == EVENTFD_TOKEN {
                    self.take_jobs();
                    if !self.closed {
                        self.arm_wake();
                    }
                } else {
                    self.complete(data >> 2, data & 3, res);
                }
            }
        }
    }

    fn take_jobs(&mut self) {
        loop {
            match self.jobs.try_recv() {
                Ok(job) => self.start(job),
                Err(mpsc::TryRecvError::Empty) => return,
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.closed = true;
                    return;
                }
            }
        }
    }

    fn pipe(&mut self) -> io::Result<(OwnedFd, OwnedFd)> {
        if let Some(p) = self.pipes.pop() {
            return Ok(p);
        }
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        // Best effort: a smaller pipe only means more rounds.
        let _ = rustix::pipe::fcntl_setpipe_size(&w, PIPE_SIZE);
        Ok((r, w))
    }

    fn start(&mut self, job: Job) {
        let (pipe_r, pipe_w) = match self.pipe() {
            Ok(p) => p,
            Err(e) => {
                let _ = job.reply.send(Err(e));
                return;
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        let timespec = Box::new(
            types::Timespec::new()
                .sec(job.timeout.as_secs())
                .nsec(job.timeout.subsec_nanos()),
        );
        let transfer = Transfer {
            pos: job.offset,
            end: job.offset + job.len,
            job,
            pipe_r,
            pipe_w,
            in_pipe: 0,
            stage: Stage::Full,
            outstanding: 0,
            r_in: None,
            r_out: None,
            timed_out: false,
            timespec,
        };
        self.transfers.insert(id, transfer);
        self.submit_round(id);
    }

    /// Queues the next round of a transfer.
    fn submit_round(&mut self, id: u64) {
        let Some(t) = self.transfers.get_mut(&id) else {
            return;
        };
        t.r_in = None;
        t.r_out = None;
        t.timed_out = false;
        let timeout = opcode::LinkTimeout::new(&*t.timespec as *const types::Timespec)
            .build()
            .user_data(id << 2 | OP_TIMEOUT);
        let entries: Vec<squeue::Entry> = if t.in_pipe > 0 {
            t.stage = Stage::Drain;
            t.outstanding = 2;
            let out = opcode::Splice::new(
                types::Fd(t.pipe_r.as_raw_fd()),
                -1,
                types::Fd(t.job.socket.as_raw_fd()),
                -1,
                t.in_pipe as u32,
            )
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(id << 2 | OP_OUT);
            vec![out, timeout]
        } else {
            t.stage = Stage::Full;
            t.outstanding = 3;
            let n = (t.end - t.pos).min(PIPE_SIZE as u64) as u32;
            let fill = opcode::Splice::new(
                types::Fd(t.job.file.as_raw_fd()),
                t.pos as i64,
                types::Fd(t.pipe_w.as_raw_fd()),
                -1,
                n,
            )
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(id << 2 | OP_IN);
            let out = opcode::Splice::new(
                types::Fd(t.pipe_r.as_raw_fd()),
                -1,
                types::Fd(t.job.socket.as_raw_fd()),
                -1,
                n,
            )
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(id << 2 | OP_OUT);
            vec![fill, out, timeout]
        };
        self.push(&entries);
    }

    fn complete(&mut self, id: u64, op: u64, res: i32) {
        let Some(t) = self.transfers.get_mut(&id) else {
            return;
        };
        match op {
            OP_IN => t.r_in = Some(res),
            OP_OUT => t.r_out = Some(res),
            _ => t.timed_out = res == -libc::ETIME,
        }
        t.outstanding -= 1;
        if t.outstanding > 0 {
            return;
        }
        let outcome = Self::settle(t);
        match outcome {
            Some(Ok(())) => self.finish(id, Ok(())),
            Some(Err(e)) => self.finish(id, Err(e)),
            None => self.submit_round(id),
        }
    }

    /// Accounts a finished round; `None` means "go on".
    fn settle(t: &mut Transfer) -> Option<io::Result<()>> {
        if t.stage == Stage::Full {
            match t.r_in {
                Some(n) if n >= 0 => {
                    t.pos += n as u64;
                    t.in_pipe += n as u64;
                    if n == 0 && t.pos < t.end {
                        return Some(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("content file ended early, at byte {}", t.pos),
                        )));
                    }
                }
                Some(e) => return Some(Err(errno(e))),
                None => return Some(Err(io::Error::other("missing completion"))),
            }
        }
        match t.r_out {
            Some(n) if n >= 0 => {
                t.in_pipe -= (n as u64).min(t.in_pipe);
                t.job.counter.inc_by(n as u64);
            }
            // Cancelled because the fill was short: the pipe is drained next.
            Some(e) if e == -libc::ECANCELED && !t.timed_out => {}
            Some(e) if e == -libc::ECANCELED || e == -libc::EINTR => {
                return Some(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("client did not read for {:?}", t.job.timeout),
                )));
            }
            Some(e) => return Some(Err(errno(e))),
            None => return Some(Err(io::Error::other("missing completion"))),
        }
        if t.timed_out {
            return Some(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("client did not read for {:?}", t.job.timeout),
            )));
        }
        if t.pos >= t.end && t.in_pipe == 0 {
            return Some(Ok(()));
        }
        None
    }

    fn finish(&mut self, id: u64, result: io::Result<()>) {
        let Some(t) = self.transfers.remove(&id) else {
            return;
        };
        // A pipe with bytes left in it is not reused.
        if result.is_ok() && t.in_pipe == 0 && self.pipes.len() < PIPE_POOL {
            self.pipes.push((t.pipe_r, t.pipe_w));
        }
        let _ = t.job.reply.send(result);
    }
}
