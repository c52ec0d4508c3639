//! A blocking Phoenix V2 client over tungstenite, enough for load scenarios.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tungstenite::{Message, WebSocket};
use uuid::Uuid;

use crate::v2;

/// One connected socket.
pub(crate) struct Client {
    pub ws: WebSocket<TcpStream>,
}

/// A decoded server frame: (ref, event, status) — enough to match replies and count broadcasts.
pub(crate) struct Frame {
    pub reference: Option<String>,
    pub event: String,
    pub ok: bool,
}

pub(crate) fn token(secret: &str, sub: Uuid) -> Result<String, String> {
    nexus::auth::mint(secret.as_bytes(), sub, Duration::from_secs(3600), &Default::default()).map_err(|e| e.to_string())
}

impl Client {
    /// Opens a socket to `path` (path and query, see `Target::socket_path`).
    pub(crate) fn connect(addr: SocketAddr, path: &str) -> Result<Client, String> {
        let stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let url = format!("ws://{addr}{path}");
        let (ws, _) = tungstenite::client(url.as_str(), stream).map_err(|e| format!("upgrade: {e}"))?;
        Ok(Client { ws })
    }

    pub(crate) fn set_timeout(&mut self, t: Option<Duration>) {
        let _ = self.ws.get_ref().set_read_timeout(t);
    }

    pub(crate) fn send(&mut self, text: String) -> Result<(), String> {
        self.ws.write(Message::text(text)).map_err(|e| e.to_string())
    }

    pub(crate) fn flush(&mut self) -> Result<(), String> {
        self.ws.flush().map_err(|e| e.to_string())
    }

    /// The next text frame, decoded; `Ok(None)` on read timeout.
    pub(crate) fn recv(&mut self) -> Result<Option<Frame>, String> {
        self.recv_text()?.map(|t| decode(&t)).transpose()
    }

    /// The next text frame as sent; `Ok(None)` on read timeout.
    pub(crate) fn recv_text(&mut self) -> Result<Option<tungstenite::Utf8Bytes>, String> {
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => return Ok(Some(t)),
                Ok(Message::Close(c)) => return Err(format!("closed by server: {c:?}")),
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Joins `topic` with `join_ref` as both the join and the message ref (a socket's channels
    /// need distinct join refs).
    pub(crate) fn join(&mut self, topic: &str, join_ref: usize) -> Result<(), String> {
        self.send(format!(r#"["{join_ref}","{join_ref}","{topic}","phx_join",{{}}]"#))?;
        self.flush()?;
        self.set_timeout(Some(Duration::from_secs(5)));
        let expected = join_ref.to_string();
        loop {
            match self.recv()? {
                Some(f) if f.reference.as_deref() == Some(expected.as_str()) && f.event == "phx_reply" => {
                    return if f.ok { Ok(()) } else { Err(format!("join {topic} refused")) };
                }
                Some(_) => {}
                None => return Err(format!("join {topic}: no reply")),
            }
        }
    }
}

/// Decodes the parts of a frame the scenarios look at (`v2::head`: any key order or layout).
fn decode(text: &str) -> Result<Frame, String> {
    let h = v2::head(text.as_bytes()).ok_or_else(|| format!("not a V2 frame: {text:.80}"))?;
    Ok(Frame { reference: h.reference.map(|r| r.text().into_owned()), event: h.event.text().into_owned(), ok: h.ok() })
}
