//! A blocking Phoenix V2 client over tungstenite, enough for load scenarios.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tungstenite::{Message, WebSocket};
use uuid::Uuid;

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
    pub(crate) fn connect(addr: SocketAddr, token: &str) -> Result<Client, String> {
        let stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let url = format!("ws://{addr}/socket/websocket?vsn=2.0.0&token={token}");
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
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => return decode(&t).map(Some),
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

/// Decodes the parts of a frame the scenarios look at. Nexus writes the first four elements as
/// plain strings or `null` and a reply's payload as `{"status":…`, so a scan does; anything
/// else (escapes, other spacing) goes through the JSON parser. The scan matters: the load
/// generator shares the machine with the server, and a full parse per frame cost it more CPU
/// than the server spent on the message.
fn decode(text: &str) -> Result<Frame, String> {
    scan(text).map_or_else(|| parse(text), Ok)
}

fn scan(text: &str) -> Option<Frame> {
    let mut rest = text.strip_prefix('[')?;
    let mut field = || -> Option<Option<&str>> {
        let value = if let Some(r) = rest.strip_prefix("null") {
            rest = r;
            None
        } else {
            let r = rest.strip_prefix('"')?;
            let end = r.find('"')?;
            if r[..end].contains('\\') {
                return None;
            }
            rest = &r[end + 1..];
            Some(&r[..end])
        };
        rest = rest.strip_prefix(',')?;
        Some(value)
    };
    let (_join_ref, reference, _topic, event) = (field()?, field()?, field()?, field()??);
    let ok = event == "phx_reply" && rest.starts_with(r#"{"status":"ok""#);
    if event == "phx_reply" && !ok && !rest.starts_with(r#"{"status":"error""#) {
        return None;
    }
    Some(Frame { reference: reference.map(str::to_string), event: event.to_string(), ok })
}

fn parse(text: &str) -> Result<Frame, String> {
    use sonic_rs::{JsonContainerTrait, JsonValueTrait};
    let v: sonic_rs::Value = sonic_rs::from_str(text).map_err(|e| format!("bad frame {text:.80}: {e}"))?;
    let arr = v.as_array().ok_or("frame is not an array")?;
    let reference = arr.get(1).and_then(|r| r.as_str()).map(str::to_string);
    let event = arr.get(3).and_then(|e| e.as_str()).unwrap_or("").to_string();
    let ok = arr.get(4).and_then(|p| p.get("status")).and_then(|s| s.as_str()) == Some("ok");
    Ok(Frame { reference, event, ok })
}

#[cfg(test)]
mod tests {
    use super::{parse, scan};

    #[test]
    fn scan_agrees_with_the_parser() {
        for text in [
            r#"["1","7","chat:x","phx_reply",{"status":"ok","response":{}}]"#,
            r#"["1","8","chat:x","phx_reply",{"status":"error","response":{"reason":"nope"}}]"#,
            r#"[null,null,"chat:x","new_msg",{"body":"hi"}]"#,
            r#"["1",null,"chat:x","presence_diff",{"joins":{},"leaves":{}}]"#,
        ] {
            let (a, b) = (scan(text).expect(text), parse(text).expect(text));
            assert_eq!((a.reference, a.event, a.ok), (b.reference, b.event, b.ok), "{text}");
        }
        assert!(scan(r#"[ "1","7","t","phx_reply",{}]"#).is_none());
        assert!(scan(r#"["1","7","t\"x","e",{}]"#).is_none());
    }
}
