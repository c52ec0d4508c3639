//! Many non-blocking client sockets on one thread: the upgrade handshake, zero-mask text frames
//! out, server frames in (split in place, no per-frame allocation; `v2` reads them), and a
//! small epoll wrapper.
//! Used by every scenario that holds more sockets than threads can.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

/// One client socket after the upgrade, with the bytes of an incomplete server frame.
pub(crate) struct Sock {
    pub stream: TcpStream,
    pending: Vec<u8>,
    /// The server closed the socket (close frame or end of stream).
    pub closed: bool,
}

/// What a read found.
pub(crate) enum Frame<'a> {
    Text(&'a [u8]),
    Close,
}

/// Opens a WebSocket to `path` (path and query, see `Target::socket_path`) from
/// `127.0.0.<source>` (several source addresses give more than 64k ports) and returns it
/// non-blocking once the server answered 101.
pub(crate) fn open(addr: SocketAddr, source: u8, path: &str) -> Result<Sock, String> {
    open_with(addr, source, path, None)
}

/// [`open`], with the socket's receive buffer set to `rcvbuf` bytes first (a small window makes
/// a client that stops reading back up into the server soon: a slow consumer).
pub(crate) fn open_with(addr: SocketAddr, source: u8, path: &str, rcvbuf: Option<usize>) -> Result<Sock, String> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).map_err(|e| e.to_string())?;
    if let Some(bytes) = rcvbuf {
        socket.set_recv_buffer_size(bytes).map_err(|e| format!("SO_RCVBUF: {e}"))?;
    }
    let local = SocketAddr::from(([127, 0, 0, source], 0));
    socket.bind(&local.into()).map_err(|e| format!("bind {local}: {e}"))?;
    socket.connect(&addr.into()).map_err(|e| format!("connect: {e}"))?;
    let mut s: TcpStream = socket.into();
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    // Byte by byte: nothing after the head may be swallowed (the server sends nothing before a
    // join, but this stays correct if it ever did).
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).map_err(|e| format!("upgrade: {e}"))?;
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        let status = head.split(|b| *b == b'\r').next().unwrap_or_default();
        return Err(format!("upgrade refused: {}", String::from_utf8_lossy(status)));
    }
    s.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(Sock { stream: s, pending: Vec::new(), closed: false })
}

/// A client text frame with a zero mask (the payload goes out as is).
pub(crate) fn masked_text(payload: &[u8], out: &mut Vec<u8>) {
    out.push(0x81);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(payload);
}

impl Sock {
    pub(crate) fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Writes all of `bytes`, waiting (briefly polling) while the socket is full.
    pub(crate) fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match self.stream.write(bytes) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_micros(200)),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sends one text frame.
    pub(crate) fn send_text(&mut self, text: &[u8]) -> io::Result<()> {
        let mut frame = Vec::with_capacity(text.len() + 14);
        masked_text(text, &mut frame);
        self.write_all(&frame)
    }

    /// Reads everything available and calls `on` for each complete server frame. Returns the
    /// bytes read. `scratch` is the thread's read buffer.
    pub(crate) fn read(&mut self, scratch: &mut [u8], mut on: impl FnMut(Frame<'_>)) -> io::Result<usize> {
        let mut total = 0;
        loop {
            let n = match self.stream.read(scratch) {
                Ok(0) => {
                    self.closed = true;
                    return Ok(total);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(total),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.closed = true;
                    return Err(e);
                }
            };
            total += n;
            if self.pending.is_empty() {
                let used = frames(&scratch[..n], &mut on, &mut self.closed);
                self.pending.extend_from_slice(&scratch[used..n]);
            } else {
                self.pending.extend_from_slice(&scratch[..n]);
                let used = frames(&self.pending, &mut on, &mut self.closed);
                self.pending.drain(..used);
            }
            if n < scratch.len() {
                return Ok(total);
            }
        }
    }
}

/// Calls `on` for each complete frame at the start of `buf`; returns the bytes used.
fn frames(buf: &[u8], on: &mut impl FnMut(Frame<'_>), closed: &mut bool) -> usize {
    let mut pos = 0;
    loop {
        let b = &buf[pos..];
        if b.len() < 2 {
            return pos;
        }
        let (len, head) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => {
                let mut l = [0u8; 8];
                l.copy_from_slice(&b[2..10]);
                (u64::from_be_bytes(l) as usize, 10)
            }
            126 | 127 => return pos,
            n => (n as usize, 2),
        };
        if b.len() < head + len {
            return pos;
        }
        match b[0] & 0x0f {
            0x1 => on(Frame::Text(&b[head..head + len])),
            0x8 => {
                *closed = true;
                on(Frame::Close);
            }
            _ => {}
        }
        pos += head + len;
    }
}

/// A thin epoll instance: register descriptors with a token, wait for readable ones.
pub(crate) struct Poller {
    ep: RawFd,
    events: Vec<libc::epoll_event>,
}

impl Poller {
    pub(crate) fn new() -> Result<Poller, String> {
        // SAFETY: plain syscall.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(format!("epoll_create1: {}", io::Error::last_os_error()));
        }
        Ok(Poller { ep, events: vec![libc::epoll_event { events: 0, u64: 0 }; 1024] })
    }

    pub(crate) fn add(&self, fd: RawFd, token: usize) -> Result<(), String> {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token as u64 };
        // SAFETY: valid epoll fd, a descriptor we own, a valid event pointer.
        if unsafe { libc::epoll_ctl(self.ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
            return Err(format!("epoll_ctl: {}", io::Error::last_os_error()));
        }
        Ok(())
    }

    pub(crate) fn remove(&self, fd: RawFd) {
        // SAFETY: removing a descriptor; errors (not registered) are harmless.
        unsafe { libc::epoll_ctl(self.ep, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
    }

    /// Tokens of the readable descriptors (level-triggered), waiting up to `timeout_ms`.
    pub(crate) fn wait(&mut self, timeout_ms: i32) -> Vec<usize> {
        // SAFETY: the events buffer has room for its length.
        let n = unsafe { libc::epoll_wait(self.ep, self.events.as_mut_ptr(), self.events.len() as i32, timeout_ms) };
        self.events.iter().take(n.max(0) as usize).map(|e| e.u64 as usize).collect()
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        // SAFETY: closing the epoll descriptor we created.
        unsafe { libc::close(self.ep) };
    }
}

/// Resident set size of a process in bytes (`/proc/<pid>/status` VmRSS).
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_frames_across_reads() {
        let mut wire = Vec::new();
        for text in [&b"hello"[..], &[b'x'; 300][..], b"end"] {
            wire.push(0x81);
            if text.len() < 126 {
                wire.push(text.len() as u8);
            } else {
                wire.push(126);
                wire.extend_from_slice(&(text.len() as u16).to_be_bytes());
            }
            wire.extend_from_slice(text);
        }
        let mut seen = Vec::new();
        let mut closed = false;
        let used = frames(
            &wire[..200],
            &mut |f| {
                if let Frame::Text(t) = f {
                    seen.push(t.len())
                }
            },
            &mut closed,
        );
        assert_eq!((used, seen.clone()), (7, vec![5]));
        let used2 = frames(
            &wire[used..],
            &mut |f| {
                if let Frame::Text(t) = f {
                    seen.push(t.len())
                }
            },
            &mut closed,
        );
        assert_eq!(used + used2, wire.len());
        assert_eq!(seen, vec![5, 300, 3]);
    }
}
