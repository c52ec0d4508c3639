//! Thin, checked wrappers over the few syscalls the server makes directly: non-blocking
//! `recv`/`send` on readiness (waiting for readiness, then reading into a per-core buffer, keeps
//! idle connections free of read buffers: BENCHMARKS.md, "Measured facts"), `shutdown`, and
//! `RLIMIT_NOFILE`.

use std::io;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};

use monoio::net::{TcpStream, UnixStream};

/// What a connection task waits on: the socket as monoio's smallest descriptor owner.
///
/// The task only needs readiness (an io_uring POLL_ADD, or epoll), which does not depend on
/// the socket's family; all IO is `recv`/`send` below. monoio's `TcpStream` carries 72 B of
/// cached addresses next to its descriptor, and it lives in every connection's task, so the
/// accepted socket is re-wrapped in a `UnixStream` (8 B).
pub(crate) type Socket = UnixStream;

/// Re-wraps an accepted TCP socket as a [`Socket`] (see there for why).
pub(crate) fn into_socket(stream: TcpStream) -> io::Result<Socket> {
    let fd = stream.into_raw_fd();
    // SAFETY: `into_raw_fd` released the descriptor; nothing else owns it.
    let std = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
    UnixStream::from_std(std)
}

fn retry<F: FnMut() -> isize>(mut f: F) -> io::Result<usize> {
    loop {
        let n = f();
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Non-blocking receive; `WouldBlock` when nothing is buffered, `Ok(0)` at end of stream.
pub(crate) fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid writable region of `buf.len()` bytes for the whole call.
    retry(|| unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) })
}

/// Non-blocking send without SIGPIPE; `WouldBlock` when the socket buffer is full.
pub(crate) fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    // SAFETY: `buf` is a valid readable region of `buf.len()` bytes for the whole call.
    retry(|| unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), flags) })
}

/// Half-closes the sending side (FIN after queued data).
pub(crate) fn shutdown_write(fd: RawFd) {
    // SAFETY: plain syscall on a descriptor we own; errors (already closed) are irrelevant.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}

/// Raises the soft open-file limit to the hard limit; returns the soft limit now in force.
pub(crate) fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: `raised` is a valid in-pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    lim.rlim_cur
}

/// A descriptor held in reserve so that, when the process runs out of descriptors, `accept`
/// can still take a pending connection off the backlog and close it instead of leaving the
/// client hanging (and the accept loop failing on every retry).
#[derive(Debug)]
pub(crate) struct SpareFd(RawFd);

impl SpareFd {
    pub(crate) fn open() -> SpareFd {
        SpareFd(open_dev_null())
    }

    /// Frees the spare, accepts and closes one pending connection, re-takes the spare.
    /// Returns whether a connection was refused.
    pub(crate) fn refuse_one(&mut self, listener: RawFd) -> bool {
        if self.0 >= 0 {
            // SAFETY: closing the descriptor we opened.
            unsafe { libc::close(self.0) };
        }
        let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        // SAFETY: accept4 with null address pointers is allowed.
        let fd = unsafe { libc::accept4(listener, std::ptr::null_mut(), std::ptr::null_mut(), flags) };
        if fd >= 0 {
            // SAFETY: closing the descriptor accept4 just gave us.
            unsafe { libc::close(fd) };
        }
        self.0 = open_dev_null();
        fd >= 0
    }
}

fn open_dev_null() -> RawFd {
    // SAFETY: the path is a valid NUL-terminated C string.
    unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) }
}

/// Whether an `accept` error means the process or system is out of descriptors or memory.
pub(crate) fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// Turns off glibc's fastbins, so a freed small block is merged with its free neighbours at
/// once instead of waiting, unmerged, for the next consolidation. A server that holds its
/// connections for months allocates and frees small objects (sessions, subscriptions, frames)
/// all the time; left in fastbins they keep neighbouring holes apart, and the heap spreads over
/// more pages while the bytes in use stay flat. In soaks with churn, RSS less the heap in use
/// grew less without them (`BENCHMARKS.md`, "The hour-long runs"), at no measured cost. The
/// per-thread cache in front of them stays on. Called once, before any thread starts.
pub(crate) fn merge_freed_blocks_at_once() {
    #[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc")))]
    // SAFETY: mallopt only sets one of the allocator's own parameters.
    unsafe {
        libc::mallopt(libc::M_MXFAST, 0);
    }
}

/// Gives the heap's free pages back to the kernel. glibc malloc keeps what is freed in the
/// middle of its arenas, so without this RSS stays at the high-water mark of every burst (a
/// join storm's `presence_state`s, a slow consumer's outbox) and creeps up with fragmentation
/// over hours. mimalloc purges its free pages by itself.
pub(crate) fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc")))]
    // SAFETY: malloc_trim only walks and releases the allocator's own free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The allocator's own view of the heap as (bytes in use, bytes free but held), for
/// `/metrics`: RSS alone cannot tell memory the program still uses from memory the allocator
/// keeps after it was freed (fragmentation), and a creep in the one calls for a different fix
/// than in the other. `None` where the allocator does not say (mimalloc, non-glibc).
pub(crate) fn heap_stats() -> Option<(u64, u64)> {
    #[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc")))]
    {
        // SAFETY: mallinfo2 only reads the allocator's own counters (it locks each arena).
        let info = unsafe { libc::mallinfo2() };
        // In use: small and mapped chunks handed out; free: chunks and fastbins held.
        let in_use = (info.uordblks + info.hblkhd) as u64;
        Some((in_use, info.fordblks as u64))
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc"))))]
    None
}

/// This host's name (for naming the node), or `localhost` if it has none.
pub(crate) fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into our buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let len = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..len]) {
        Ok(name) if rc == 0 && !name.is_empty() => name.to_string(),
        _ => "localhost".to_string(),
    }
}
