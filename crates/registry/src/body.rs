//! How a content-store file becomes response bytes.
//!
//! On plain TCP the kernel moves the bytes from the page cache to the socket
//! (`sendfile`), so they never pass through this process. Over TLS, or when
//! zero-copy is turned off, the file is read into a buffer and written.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::Interest;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The ways a file body can leave the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServingPath {
    /// io_uring `splice` file → pipe → socket (see [`super::uring`]).
    IoUring,
    /// Non-blocking `sendfile(2)` from the file to the socket.
    Sendfile,
    /// `pread` into a buffer, then `write`: works on every transport.
    Buffered,
}

impl ServingPath {
    pub fn as_str(self) -> &'static str {
        match self {
            ServingPath::IoUring => "io_uring",
            ServingPath::Sendfile => "sendfile",
            ServingPath::Buffered => "buffered",
        }
    }
}

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServingPathChoice {
    /// The path that measured cheapest here (sendfile), or io_uring where
    /// that is the default and the kernel allows it.
    Auto,
    /// Exactly this path; the daemon refuses to start without it.
    Exactly(ServingPath),
}

impl clap::ValueEnum for ServingPathChoice {
    fn value_variants<'a>() -> &'a [Self] {
        &[
            ServingPathChoice::Auto,
            ServingPathChoice::Exactly(ServingPath::IoUring),
            ServingPathChoice::Exactly(ServingPath::Sendfile),
            ServingPathChoice::Exactly(ServingPath::Buffered),
        ]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        use clap::builder::PossibleValue;
        Some(match self {
            ServingPathChoice::Auto => PossibleValue::new("auto")
                .help("The path that measured cheapest here (sendfile; see benches/README.md)"),
            ServingPathChoice::Exactly(ServingPath::IoUring) => PossibleValue::new("io-uring")
                .help("io_uring splice file → pipe → socket; refuses to start without it"),
            ServingPathChoice::Exactly(ServingPath::Sendfile) => PossibleValue::new("sendfile")
                .help("sendfile(2): the kernel copies from the page cache to the socket"),
            ServingPathChoice::Exactly(ServingPath::Buffered) => PossibleValue::new("buffered")
                .help("Read into a buffer and write it (no zero-copy)"),
        })
    }
}

/// How file bodies leave the process, chosen once at start-up.
#[derive(Clone)]
pub enum FileBodies {
    IoUring(super::uring::Uring),
    Sendfile,
    Buffered,
}

impl FileBodies {
    pub fn path(&self) -> ServingPath {
        match self {
            FileBodies::IoUring(_) => ServingPath::IoUring,
            FileBodies::Sendfile => ServingPath::Sendfile,
            FileBodies::Buffered => ServingPath::Buffered,
        }
    }

    /// Sets up the chosen path. io_uring, when asked for exactly, must work
    /// here; `uring_workers` caps the kernel workers that may wait on
    /// sockets (enough for every upload the limits allow).
    pub async fn choose(
        choice: ServingPathChoice,
        uring_workers: u32,
        gauges: super::uring::UringGauges,
    ) -> io::Result<FileBodies> {
        match choice {
            // sendfile measured cheaper than io_uring on this kind of
            // machine (benches/README.md).
            ServingPathChoice::Auto | ServingPathChoice::Exactly(ServingPath::Sendfile) => {
                Ok(FileBodies::Sendfile)
            }
            ServingPathChoice::Exactly(ServingPath::Buffered) => Ok(FileBodies::Buffered),
            ServingPathChoice::Exactly(ServingPath::IoUring) => {
                tokio::task::spawn_blocking(move || super::uring::Uring::new(gauges, uring_workers))
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e)))
                    .map(FileBodies::IoUring)
            }
        }
    }
}

impl std::fmt::Display for ServingPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Largest single `sendfile` call (nginx's `sendfile_max_chunk` default).
/// One call holds the socket lock while it fills the send buffer; ACKs
/// that arrive meanwhile wait in the socket backlog and are processed, with
/// the transmissions they release, by this thread when the call returns.
/// With 16 MiB calls the server paid 0.44–0.51 CPU-s/GiB against curl on
/// loopback; with 2 MiB, 0.29–0.42, level with nginx (`benches/README.md`).
const SENDFILE_CHUNK: u64 = 2 << 20;
/// Buffer size of the buffered path.
const BUFFERED_CHUNK: usize = 1 << 20;

fn stalled(what: &str, stall: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("client made no progress reading the {what} for {stall:?}"),
    )
}

fn file_ended(offset: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("content file ended early, at byte {offset}"),
    )
}

/// Sends `len` bytes of `file` from `offset` with `sendfile(2)`. Fails when the
/// client makes no progress for `stall`.
pub async fn sendfile(
    socket: &TcpStream,
    file: &File,
    offset: u64,
    len: u64,
    stall: Duration,
    sent_bytes: &Counter,
) -> io::Result<()> {
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let count = (end - pos).min(SENDFILE_CHUNK) as usize;
        let sent = tokio::time::timeout(
            stall,
            socket.async_io(Interest::WRITABLE, || {
                rustix::fs::sendfile(socket, file, Some(&mut pos), count).map_err(io::Error::from)
            }),
        )
        .await
        .map_err(|_| stalled("body", stall))??;
        if sent == 0 {
            return Err(file_ended(pos));
        }
        sent_bytes.inc_by(sent as u64);
    }
    Ok(())
}

/// Copies `len` bytes of `file` from `offset` through a buffer. Reads run on
/// the blocking pool so that a slow disk never stalls other connections.
pub async fn buffered<W: AsyncWrite + Unpin>(
    writer: &mut W,
    file: File,
    offset: u64,
    len: u64,
    stall: Duration,
    sent_bytes: &Counter,
) -> io::Result<()> {
    let file = std::sync::Arc::new(file);
    let mut pos = offset;
    let end = offset + len;
    let mut buf = vec![0u8; BUFFERED_CHUNK.min(len as usize)];
    while pos < end {
        let want = ((end - pos) as usize).min(buf.len());
        let f = file.clone();
        let (b, read) = tokio::task::spawn_blocking(move || {
            let r = f.read_at(&mut buf[..want], pos);
            (buf, r)
        })
        .await
        .map_err(io::Error::other)?;
        buf = b;
        let read = read?;
        if read == 0 {
            return Err(file_ended(pos));
        }
        tokio::time::timeout(stall, writer.write_all(&buf[..read]))
            .await
            .map_err(|_| stalled("body", stall))??;
        pos += read as u64;
        sent_bytes.inc_by(read as u64);
    }
    Ok(())
}

impl FileBodies {
    /// Sets up the serving path the settings choose, says once which one is
    /// used and exports it.
    pub async fn choose_for(
        settings: &crate::RegistrySettings,
        metrics: &peermirror_metrics::Metrics,
    ) -> std::io::Result<FileBodies> {
        // Enough kernel workers for every upload the limits allow.
        let uploads = settings.uploads.total;
        let workers = u32::try_from(uploads).unwrap_or(u32::MAX).clamp(16, 1024);
        let gauges = crate::uring::UringGauges {
            in_flight: metrics.uring_in_flight.clone(),
            idle_pipes: metrics.uring_idle_pipes.clone(),
        };
        let files = FileBodies::choose(settings.serving_path, workers, gauges).await?;
        let path = files.path();
        tracing::info!(serving_path = %path, "blob bodies on plain HTTP are sent with {path}");
        metrics
            .serving_path
            .get_or_create(&peermirror_metrics::ServingPathLabels {
                path: path.as_str().to_string(),
            })
            .set(1);
        Ok(files)
    }
}
