//! File bodies through io_uring: `splice(file → pipe)`, then
//! `splice(pipe → socket)` whenever a poll says the socket takes more, so
//! the bytes never enter userspace and each round moves up to a pipe-full
//! (4 MiB where the kernel allows it) of data.
//!
//! One reactor thread owns the ring (tokio cannot drive io_uring
//! completions, and tokio-uring cannot drive tokio's sockets). Transfers are
//! handed to it over a channel and an eventfd that a standing read in the
//! ring watches; each transfer's future waits on a oneshot.
//!
//! Safety of file descriptors: the reactor works on `dup`ed descriptors it
//! owns until the last operation that names them has completed, so a client
//! connection dropped mid-transfer can never make the ring touch a reused
//! descriptor number.
//!
//! Time limits: every operation has a deadline (the write timeout) that the
//! reactor enforces with `IORING_OP_ASYNC_CANCEL`, which interrupts a splice
//! waiting in an io-wq worker. (A linked timeout is not armed for a splice
//! that io_uring runs in io-wq, so it cannot be used here.) The socket stays
//! non-blocking and is written only after a poll says it has room, so no
//! worker ever waits on a slow client; the io-wq worker pool that runs the
//! file reads is capped.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, squeue, types};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// Bytes moved per round (and the pipe's capacity) when the kernel allows
/// it; root may exceed `/proc/sys/fs/pipe-max-size`. The size a pipe really
/// got is what its rounds use.
const PIPE_SIZE: usize = 4 << 20;
/// Ring size: room for many chains of three entries.
const RING_ENTRIES: u32 = 256;
/// Kernel workers that may read files at once (io-wq's bounded class).
const IOWQ_FILE_WORKERS: u32 = 4;
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

/// What the reactor reports (for metrics and tests).
#[derive(Clone, Default)]
pub struct UringGauges {
    /// Transfers the reactor holds: back to zero when every client has
    /// finished, left or timed out.
    pub in_flight: Gauge,
    /// Idle pipes kept for reuse (at most [`PIPE_POOL`]); each holds two
    /// descriptors.
    pub idle_pipes: Gauge,
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
    /// `socket_workers` caps the kernel workers that may wait on sockets
    /// (io-wq's unbounded class): splices beyond it queue in the kernel.
    pub fn new(gauges: UringGauges, socket_workers: u32) -> io::Result<Uring> {
        let ring: IoUring = IoUring::builder().setup_clamp().build(RING_ENTRIES)?;
        let mut max = [IOWQ_FILE_WORKERS, socket_workers];
        ring.submitter().register_iowq_max_workers(&mut max)?;
        let wake = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)?;
        let wake_reactor = wake.try_clone()?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("peermirror-uring".into())
            .spawn(move || Reactor::new(ring, wake_reactor, rx, gauges).run())?;
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
        self.submit(job)?;
        done.await
            .map_err(|_| io::Error::other("io_uring reactor has stopped"))?
    }

    /// Hands a transfer to the reactor thread and wakes it.
    fn submit(&self, job: Job) -> io::Result<()> {
        self.inner
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job)
            .map_err(|_| io::Error::other("io_uring reactor has stopped"))?;
        rustix::io::write(&self.inner.wake, &1u64.to_ne_bytes())?;
        Ok(())
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
        self.submit(job)?;
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

/// What a transfer's round in flight does.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    /// splice file → pipe, linked to splice pipe → socket: one submission
    /// moves a pipe-full when the socket has room (two completions).
    FillDrain,
    /// wait until the socket can take more.
    Poll,
    /// splice pipe → socket (non-blocking: as much as fits).
    Drain,
}

struct Transfer {
    job: Job,
    pipe_r: OwnedFd,
    pipe_w: OwnedFd,
    pipe_size: u64,
    pos: u64,
    end: u64,
    in_pipe: u64,
    stage: Stage,
    /// Completions the round still waits for; descriptors stay open until
    /// the last one, since a linked operation resolves them when it starts.
    outstanding: u8,
    fill: Option<i32>,
    drain: Option<i32>,
    /// When the round must have completed.
    deadline: Instant,
    /// A cancel was sent because this round's deadline passed (cleared when
    /// the next round starts: a cancel that loses the race against a
    /// successful completion must not leave the transfer without a deadline).
    expired: bool,
    /// Counts rounds; part of every operation's user data, so that a late
    /// cancel can never match an operation of a later round.
    round: u64,
}

struct Reactor {
    ring: IoUring,
    wake: OwnedFd,
    wake_buf: Box<[u8; 8]>,
    jobs: mpsc::Receiver<Job>,
    transfers: HashMap<u64, Transfer>,
    next_id: u64,
    pipes: Vec<(OwnedFd, OwnedFd, u64)>,
    closed: bool,
    gauges: UringGauges,
}

/// user_data: transfer id in the high 48 bits, the round (modulo 2^14)
/// in the next 14, operation in the low two.
const OP_FILL: u64 = 0;
const OP_DRAIN: u64 = 1;
const OP_POLL: u64 = 2;
const OP_CANCEL: u64 = 3;
const ROUND_BITS: u64 = 14;

fn user_data(id: u64, round: u64, op: u64) -> u64 {
    id << (ROUND_BITS + 2) | (round & ((1 << ROUND_BITS) - 1)) << 2 | op
}

/// The transfer id, round and operation of a completion's user data.
fn decode(data: u64) -> (u64, u64, u64) {
    (
        data >> (ROUND_BITS + 2),
        (data >> 2) & ((1 << ROUND_BITS) - 1),
        data & 3,
    )
}
/// How often the reactor looks for expired operations at the least.
const TICK: Duration = Duration::from_millis(250);

fn errno(res: i32) -> io::Error {
    io::Error::from_raw_os_error(-res)
}

impl Reactor {
    fn new(
        ring: IoUring,
        wake: OwnedFd,
        jobs: mpsc::Receiver<Job>,
        gauges: UringGauges,
    ) -> Reactor {
        Reactor {
            ring,
            wake,
            wake_buf: Box::new([0; 8]),
            jobs,
            transfers: HashMap::new(),
            next_id: 1,
            pipes: Vec::new(),
            closed: false,
            gauges,
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

    /// Pushes entries (a linked chain stays together), submitting first when
    /// the queue is full.
    fn push(&mut self, entries: &[squeue::Entry]) {
        loop {
            // SAFETY: every pointer in an entry (the eventfd buffer) lives in
            // the reactor until its completion is reaped; descriptors are
            // owned by the transfer until then.
            let pushed = unsafe { self.ring.submission().push_multiple(entries) };
            if pushed.is_ok() {
                return;
            }
            let _ = self.ring.submit();
        }
    }

    fn run(mut self) {
        self.arm_wake();
        let mut completions: Vec<(u64, i32)> = Vec::with_capacity(64);
        loop {
            if self.closed && self.transfers.is_empty() {
                return;
            }
            // Wait for a completion, or until the nearest deadline.
            let now = Instant::now();
            let wait = self
                .transfers
                .values()
                .filter(|t| !t.expired)
                .map(|t| t.deadline.saturating_duration_since(now))
                .min()
                .unwrap_or(TICK)
                .min(TICK);
            let ts = types::Timespec::new()
                .sec(wait.as_secs())
                .nsec(wait.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            if let Err(e) = self.ring.submitter().submit_with_args(1, &args)
                && !matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                )
            {
                tracing::error!(error = %e, "io_uring submit failed; stopping the io_uring serving path");
                for (_, t) in self.transfers.drain() {
                    let _ = t.job.reply.send(Err(io::Error::other("io_uring failed")));
                }
                return;
            }
            completions.clear();
            completions.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for &(data, res) in &completions {
                if data == EVENTFD_TOKEN {
                    self.take_jobs();
                    if !self.closed {
                        self.arm_wake();
                    }
                } else {
                    let (id, round, op) = decode(data);
                    if op != OP_CANCEL {
                        self.complete(id, round, op, res);
                    }
                }
            }
            self.expire();
        }
    }

    /// Cancels the rounds whose deadline passed (a client that stopped
    /// reading, a disk that stalled). A cancelled splice that waits in an
    /// io-wq worker is interrupted.
    fn expire(&mut self) {
        let now = Instant::now();
        let expired: Vec<(u64, u64, Stage)> = self
            .transfers
            .iter_mut()
            .filter(|(_, t)| !t.expired && t.deadline <= now)
            .map(|(id, t)| {
                t.expired = true;
                (*id, t.round, t.stage)
            })
            .collect();
        for (id, round, stage) in expired {
            let ops: &[u64] = match stage {
                Stage::FillDrain => &[OP_FILL, OP_DRAIN],
                Stage::Drain => &[OP_DRAIN],
                Stage::Poll => &[OP_POLL],
            };
            for op in ops {
                let cancel = opcode::AsyncCancel::new(user_data(id, round, *op))
                    .build()
                    .user_data(user_data(id, round, OP_CANCEL));
                self.push(&[cancel]);
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

    fn pipe(&mut self) -> io::Result<(OwnedFd, OwnedFd, u64)> {
        if let Some(p) = self.pipes.pop() {
            self.gauges.idle_pipes.set(self.pipes.len() as i64);
            return Ok(p);
        }
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        // Best effort: a smaller pipe only means more rounds.
        let size = rustix::pipe::fcntl_setpipe_size(&w, PIPE_SIZE)
            .or_else(|_| rustix::pipe::fcntl_setpipe_size(&w, 1 << 20))
            .or_else(|_| rustix::pipe::fcntl_getpipe_size(&w))?;
        Ok((r, w, size as u64))
    }

    fn start(&mut self, job: Job) {
        let (pipe_r, pipe_w, pipe_size) = match self.pipe() {
            Ok(p) => p,
            Err(e) => {
                let _ = job.reply.send(Err(e));
                return;
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        let transfer = Transfer {
            pos: job.offset,
            end: job.offset + job.len,
            deadline: Instant::now() + job.timeout,
            job,
            pipe_r,
            pipe_w,
            pipe_size,
            in_pipe: 0,
            stage: Stage::FillDrain,
            outstanding: 0,
            fill: None,
            drain: None,
            expired: false,
            round: 0,
        };
        self.transfers.insert(id, transfer);
        self.gauges.in_flight.set(self.transfers.len() as i64);
        self.submit(id, Stage::FillDrain);
    }

    /// Queues a transfer's next round.
    fn submit(&mut self, id: u64, stage: Stage) {
        let Some(t) = self.transfers.get_mut(&id) else {
            return;
        };
        t.stage = stage;
        t.deadline = Instant::now() + t.job.timeout;
        t.expired = false;
        t.round += 1;
        t.fill = None;
        t.drain = None;
        let drain = |t: &Transfer, len: u64| {
            opcode::Splice::new(
                types::Fd(t.pipe_r.as_raw_fd()),
                -1,
                types::Fd(t.job.socket.as_raw_fd()),
                -1,
                len as u32,
            )
            .build()
            .user_data(user_data(id, t.round, OP_DRAIN))
        };
        match stage {
            Stage::FillDrain => {
                t.outstanding = 2;
                let n = (t.end - t.pos).min(t.pipe_size);
                let fill = opcode::Splice::new(
                    types::Fd(t.job.file.as_raw_fd()),
                    t.pos as i64,
                    types::Fd(t.pipe_w.as_raw_fd()),
                    -1,
                    n as u32,
                )
                .build()
                .flags(squeue::Flags::IO_LINK)
                .user_data(user_data(id, t.round, OP_FILL));
                // A short fill breaks the link: the drain is cancelled and
                // the bytes in the pipe are drained by the next round.
                let entries = [fill, drain(t, t.in_pipe + n)];
                self.push(&entries);
            }
            Stage::Poll => {
                t.outstanding = 1;
                let poll =
                    opcode::PollAdd::new(types::Fd(t.job.socket.as_raw_fd()), libc::POLLOUT as u32)
                        .build()
                        .user_data(user_data(id, t.round, OP_POLL));
                self.push(&[poll]);
            }
            Stage::Drain => {
                t.outstanding = 1;
                let entry = drain(t, t.in_pipe);
                self.push(&[entry]);
            }
        }
    }

    fn complete(&mut self, id: u64, round: u64, op: u64, res: i32) {
        let Some(t) = self.transfers.get_mut(&id) else {
            return;
        };
        if round != t.round & ((1 << ROUND_BITS) - 1) {
            return; // of an earlier round: cannot happen, never acted on
        }
        match op {
            OP_FILL => t.fill = Some(res),
            OP_DRAIN => t.drain = Some(res),
            _ => {}
        }
        t.outstanding = t.outstanding.saturating_sub(1);
        if t.outstanding > 0 {
            return;
        }
        let poll_result = (op == OP_POLL).then_some(res);
        match Self::next_stage(t, poll_result) {
            Ok(Some(stage)) => self.submit(id, stage),
            Ok(None) => self.finish(id, Ok(())),
            Err(e) => self.finish(id, Err(e)),
        }
    }

    /// Accounts a finished round and says what comes next (`None`: the
    /// transfer is complete).
    fn next_stage(t: &mut Transfer, poll: Option<i32>) -> io::Result<Option<Stage>> {
        let failed = t.fill.is_some_and(|r| r < 0)
            || t.drain
                .is_some_and(|r| r < 0 && r != -libc::EAGAIN && r != -libc::ECANCELED)
            || poll.is_some_and(|r| r < 0);
        if t.expired && (failed || t.drain == Some(-libc::ECANCELED)) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no progress for {:?} (client not reading, or disk stalled)",
                    t.job.timeout
                ),
            ));
        }
        if let Some(r) = poll {
            return if r < 0 {
                Err(errno(r))
            } else {
                Ok(Some(Stage::Drain))
            };
        }
        if let Some(r) = t.fill {
            if r < 0 {
                return Err(errno(r));
            }
            if r == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("content file ended early, at byte {}", t.pos),
                ));
            }
            t.pos += r as u64;
            t.in_pipe += r as u64;
        }
        let mut socket_full = false;
        match t.drain {
            Some(r) if r > 0 => {
                let n = r as u64;
                t.in_pipe -= n.min(t.in_pipe);
                t.job.counter.inc_by(n);
            }
            Some(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "socket took no bytes",
                ));
            }
            Some(r) if r == -libc::EAGAIN => socket_full = true,
            // Cancelled because the fill was short: drained next round.
            Some(r) if r == -libc::ECANCELED => {}
            Some(r) => return Err(errno(r)),
            None => {}
        }
        if t.in_pipe > 0 {
            Ok(Some(if socket_full {
                Stage::Poll
            } else {
                Stage::Drain
            }))
        } else if t.pos < t.end {
            Ok(Some(Stage::FillDrain))
        } else {
            Ok(None)
        }
    }

    fn finish(&mut self, id: u64, result: io::Result<()>) {
        let Some(t) = self.transfers.remove(&id) else {
            return;
        };
        self.gauges.in_flight.set(self.transfers.len() as i64);
        // A pipe with bytes left in it is not reused.
        if result.is_ok() && t.in_pipe == 0 && self.pipes.len() < PIPE_POOL {
            self.pipes.push((t.pipe_r, t.pipe_w, t.pipe_size));
        }
        self.gauges.idle_pipes.set(self.pipes.len() as i64);
        let _ = t.job.reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        for (id, round, op) in [
            (1, 1, OP_FILL),
            (12345, (1 << ROUND_BITS) - 1, OP_CANCEL),
            (1 << 40, 7, OP_POLL),
        ] {
            assert_eq!(decode(user_data(id, round, op)), (id, round, op));
        }
        // A round that wraps stays within its bits.
        assert_eq!(
            decode(user_data(3, 1 << ROUND_BITS, OP_DRAIN)),
            (3, 0, OP_DRAIN)
        );
    }

    /// A cancel that loses the race against a successful completion leaves
    /// the transfer expired; the next round must be under a deadline again
    /// (a zero-window client would otherwise hold its slot forever).
    #[test]
    fn the_next_round_has_a_deadline_again() {
        let ring: IoUring = IoUring::builder().build(8).expect("io_uring");
        let wake =
            rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).expect("eventfd");
        let (_tx, rx) = mpsc::channel();
        let mut reactor = Reactor::new(ring, wake, rx, UringGauges::default());
        let file = tempfile_in_dev_shm().expect("tmpfile");
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let (reply, _done) = oneshot::channel();
        reactor.start(Job {
            file: file.as_fd().try_clone_to_owned().expect("dup"),
            socket: a.into(),
            offset: 0,
            len: 1 << 20,
            timeout: Duration::from_millis(10),
            counter: Counter::default(),
            reply,
        });
        let id = *reactor.transfers.keys().next().expect("transfer");
        let t = reactor.transfers.get_mut(&id).expect("transfer");
        // The deadline passed and a cancel went out; then the round
        // completed anyway and the next one starts.
        t.deadline = Instant::now();
        reactor.expire();
        assert!(reactor.transfers[&id].expired);
        reactor.submit(id, Stage::Poll);
        let t = &reactor.transfers[&id];
        assert!(!t.expired, "the new round is not under a deadline");
        assert!(t.deadline > Instant::now());
        assert_eq!(t.round, 2);
    }

    fn big_file(len: usize) -> File {
        let mut f = tempfile_in_dev_shm().expect("tmpfile");
        let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
        for _ in 0..len / chunk.len() {
            io::Write::write_all(&mut f, &chunk).expect("write");
        }
        f
    }

    async fn pair() -> (TcpStream, std::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = std::net::TcpStream::connect(addr).expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (server, client)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sends_a_file_and_gives_up_on_a_client_that_stops_reading() {
        let uring = tokio::task::spawn_blocking(|| Uring::new(UringGauges::default(), 16))
            .await
            .expect("join")
            .expect("io_uring");
        let file = big_file(32 << 20);
        let counter = Counter::default();

        // A reading client gets every byte.
        let (server, client) = pair().await;
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            io::Read::read_to_end(&mut &client, &mut got).expect("read");
            got
        });
        uring
            .send(
                &file,
                &server,
                1000,
                20 << 20,
                Duration::from_secs(5),
                &counter,
            )
            .await
            .expect("send");
        drop(server);
        let got = reader.join().expect("reader");
        assert_eq!(got.len(), 20 << 20);
        assert!(
            got.iter()
                .enumerate()
                .all(|(i, b)| *b == ((i + 1000) % (1 << 20) % 251) as u8)
        );
        assert_eq!(counter.get(), 20 << 20);

        // A client that never reads is given up after the timeout.
        let (server, _client) = pair().await;
        let started = std::time::Instant::now();
        let err = uring
            .send(
                &file,
                &server,
                0,
                32 << 20,
                Duration::from_millis(500),
                &counter,
            )
            .await
            .expect_err("must time out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        // The socket is non-blocking again for tokio.
        let flags = rustix::fs::fcntl_getfl(&server).expect("flags");
        assert!(flags.contains(rustix::fs::OFlags::NONBLOCK));
    }
}
