//! criterion: the per-message protocol work of one connection — Phoenix V1/V2 decode of typical
//! inbound frames, V1/V2 encode of a reply and of a `new_msg` broadcast (JSON alone, and as the
//! complete WebSocket frame the fan-out queues per broadcast), WebSocket decode (header parse, unmask,
//! UTF-8 check) of a masked client text frame, and HS256 JWT verification of a valid token and
//! of a forged one (a hostile client's refusal cost).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use jsonwebtoken::errors::ErrorKind;
use nexus::auth::{mint, AuthError, Verifier};
use nexus::chat;
use nexus::phoenix::{self, Outbound, Vsn};
use nexus::store::Message;
use nexus::ws::{Decoder, Message as WsMessage};
use uuid::Uuid;

const TOPIC: &str = "chat:0192b3c4-d5e6-7f80-9a1b-2c3d4e5f6a7b";
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

/// A 100-byte message body.
fn body() -> String {
    "The quick brown fox jumps over the lazy dog; ".repeat(3)[..100].to_string()
}

/// `(name, text)` of the inbound frames a client sends most: heartbeat, join, a 100 B `new_msg`.
fn inbound(vsn: Vsn) -> [(&'static str, String); 3] {
    let body = body();
    match vsn {
        Vsn::V2 => [
            ("heartbeat", r#"[null,"12","phoenix","heartbeat",{}]"#.to_string()),
            ("phx_join", format!(r#"["3","3","{TOPIC}","phx_join",{{}}]"#)),
            ("new_msg_100B", format!(r#"["3","7","{TOPIC}","new_msg",{{"body":"{body}"}}]"#)),
        ],
        Vsn::V1 => [
            ("heartbeat", r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"12"}"#.to_string()),
            (
                "phx_join",
                format!(r#"{{"topic":"{TOPIC}","event":"phx_join","payload":{{}},"ref":"3","join_ref":"3"}}"#),
            ),
            (
                "new_msg_100B",
                format!(
                    r#"{{"topic":"{TOPIC}","event":"new_msg","payload":{{"body":"{body}"}},"ref":"7","join_ref":"3"}}"#
                ),
            ),
        ],
    }
}

fn vsn_name(vsn: Vsn) -> &'static str {
    match vsn {
        Vsn::V1 => "v1",
        Vsn::V2 => "v2",
    }
}

fn phoenix_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("phoenix_decode");
    group.throughput(Throughput::Elements(1));
    for vsn in [Vsn::V1, Vsn::V2] {
        for (name, text) in inbound(vsn) {
            phoenix::decode(vsn, &text).expect("valid frame");
            group.bench_function(format!("{}_{name}", vsn_name(vsn)), |b| {
                b.iter(|| black_box(phoenix::decode(black_box(vsn), black_box(&text))))
            });
        }
    }
    group.finish();
}

fn phoenix_encode(c: &mut Criterion) {
    let message = Message {
        id: Uuid::from_u128(0x0192_b3c4_d5e6_7f80_9a1b_2c3d_4e5f_6a7c),
        conversation: Uuid::from_u128(0x0192_b3c4_d5e6_7f80_9a1b_2c3d_4e5f_6a7b),
        sender: Uuid::from_u128(0x0192_b3c4_d5e6_7f80_9a1b_2c3d_4e5f_6a7d),
        body: body(),
        inserted_at_us: 1_764_000_000_000_000,
        seq: 0,
    };
    let broadcast_payload = chat::new_msg_payload(&message);
    let reply_payload = br#"{"status":"ok","response":{}}"#;
    let reply = Outbound {
        join_ref: Some("3"),
        reference: Some("7"),
        topic: TOPIC,
        event: "phx_reply",
        payload: reply_payload,
    };
    let broadcast =
        Outbound { join_ref: None, reference: None, topic: TOPIC, event: chat::NEW_MSG, payload: &broadcast_payload };

    let mut group = c.benchmark_group("phoenix_encode");
    group.throughput(Throughput::Elements(1));
    for vsn in [Vsn::V1, Vsn::V2] {
        for (name, msg) in [("reply", &reply), ("broadcast_new_msg_100B", &broadcast)] {
            // JSON only, into a reused buffer (no allocation).
            let mut out = Vec::with_capacity(512);
            group.bench_function(format!("{}_{name}", vsn_name(vsn)), |b| {
                b.iter(|| {
                    out.clear();
                    phoenix::encode(black_box(vsn), black_box(msg), &mut out);
                    black_box(out.len())
                })
            });
            // The complete WebSocket frame, as queued per reply / per broadcast (one allocation).
            group.bench_function(format!("{}_{name}_frame", vsn_name(vsn)), |b| {
                b.iter(|| black_box(nexus::wire::encode_frame(black_box(vsn), black_box(msg))))
            });
        }
    }
    group.finish();
}

/// A client (masked) WebSocket text frame carrying `payload` (< 64 KiB).
fn masked_text_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut out = vec![0x81];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

fn ws_decode(c: &mut Criterion) {
    let [_, _, (_, text)] = inbound(Vsn::V2);
    let frame = masked_text_frame(text.as_bytes());
    let max = nexus::limits::FRAME_BYTES_MAX_DEFAULT;
    let mut decoder = Decoder::default();
    match decoder.decode(&mut frame.clone(), max) {
        Ok(Some((Some(WsMessage::Text(t)), n))) if t == text && n == frame.len() => {}
        other => panic!("unexpected decode: {other:?}"),
    }

    let mut group = c.benchmark_group("ws_decode");
    group.throughput(Throughput::Bytes(frame.len() as u64));
    // Unmasking is in place: each iteration gets a fresh copy (made outside the timing).
    group.bench_function(format!("masked_text_{}B", frame.len()), |b| {
        b.iter_batched_ref(
            || frame.clone(),
            |buf| {
                let _ = black_box(decoder.decode(black_box(buf), max));
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn jwt_verify(c: &mut Criterion) {
    let sub = Uuid::from_u128(0x0192_b3c4_d5e6_7f80_9a1b_2c3d_4e5f_6a7d);
    let verifier = Verifier::new(SECRET, 0);
    let valid = mint(SECRET, sub, Duration::from_secs(24 * 3600), &Default::default()).expect("mint");
    // Well-formed HS256 token signed with another secret: refused at the signature check.
    let forged =
        mint(b"not the server's secret, same length", sub, Duration::from_secs(24 * 3600), &Default::default())
            .expect("mint");
    assert_eq!(verifier.verify(Some(&valid)).expect("valid token"), sub);
    match verifier.verify(Some(&forged)) {
        Err(AuthError::Invalid(e)) if matches!(e.kind(), ErrorKind::InvalidSignature) => {}
        other => panic!("forged token not refused for its signature: {other:?}"),
    }

    let mut group = c.benchmark_group("jwt_verify");
    group.throughput(Throughput::Elements(1));
    group.bench_function("hs256_valid", |b| b.iter(|| black_box(verifier.verify(black_box(Some(&valid))))));
    group.bench_function("hs256_bad_signature", |b| b.iter(|| black_box(verifier.verify(black_box(Some(&forged))))));
    group.finish();
}

/// The join policy's decision for one join, as a core makes it: `open`, `token` with a grant
/// in the socket token, `token` with a join token in the payload (one HS256 check), and
/// `proxy` answered from its cache (filled with 10,000 answers by a backend on a thread).
fn join_policy(c: &mut Criterion) {
    use nexus::access::{Access, Decision};
    use nexus::config::{JoinPolicy, ProxyConfig, Secret};
    let user = Uuid::from_u128(0x0192_b3c4_d5e6_7f80_9a1b_2c3d_4e5f_6a7d);
    let chat = Uuid::from_u128(0x0195_f1b2_7c3a_7d4e_8f00_1234_5678_9abc);
    let grants = [Uuid::from_u128(1), Uuid::from_u128(2), chat];
    let grant = nexus::auth::Grant { chats: vec![], chat: Some(chat) };
    let join_token = mint(SECRET, user, Duration::from_secs(300), &grant).expect("mint");
    let payload = format!(r#"{{"token":"{join_token}"}}"#);
    let open = Access::start(&JoinPolicy::Open, SECRET, 0).expect("open");
    let token = Access::start(&JoinPolicy::Token, SECRET, 0).expect("token");
    let config = ProxyConfig {
        url: format!("http://{}/authorize", allowing_backend()),
        secret: Secret::new("s"),
        timeout: Duration::from_secs(5),
        cache_ttl: Duration::from_secs(3600),
    };
    let proxy = Access::start(&JoinPolicy::Proxy(config), SECRET, 0).expect("proxy");
    const CACHED: u128 = 10_000;
    let cache = proxy.proxy().expect("proxy policy");
    // In chunks the call queue takes whole.
    for chunk in (0..CACHED).collect::<Vec<_>>().chunks(1_000) {
        for &i in chunk {
            assert_eq!(proxy.ask(Uuid::from_u128(i), chat, || Box::new(|_| {})), None, "queued");
        }
        while cache.queued() > 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    assert_eq!(open.join(user, chat, "{}", &[]), Decision::Allow);
    assert_eq!(token.join(user, chat, "{}", &grants), Decision::Allow);
    assert_eq!(token.join(user, chat, &payload, &[]), Decision::Allow);
    let cached_user = Uuid::from_u128(CACHED / 2);
    while proxy.join(cached_user, chat, "{}", &[]) != Decision::Allow {
        std::thread::sleep(Duration::from_millis(5)); // its answer is being recorded
    }
    while cache.stats().calls.load(std::sync::atomic::Ordering::Relaxed) < CACHED as u64 {
        std::thread::sleep(Duration::from_millis(5));
    }

    let mut group = c.benchmark_group("join_policy");
    group.throughput(Throughput::Elements(1));
    group.bench_function("open", |b| b.iter(|| black_box(open.join(user, chat, black_box("{}"), &[]))));
    group.bench_function("token_grant", |b| b.iter(|| black_box(token.join(user, chat, black_box("{}"), &grants))));
    group
        .bench_function("token_join_token", |b| b.iter(|| black_box(token.join(user, chat, black_box(&payload), &[]))));
    group.bench_function("proxy_cached", |b| b.iter(|| black_box(proxy.join(cached_user, chat, black_box("{}"), &[]))));
    group.finish();
}

/// A backend on loopback that allows everything (HTTP/1.1 keep-alive, one thread per
/// connection); its address.
fn allowing_backend() -> std::net::SocketAddr {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut out = stream;
                loop {
                    let mut length = 0;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err()
                        || out.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

criterion_group!(benches, phoenix_decode, phoenix_encode, ws_decode, jwt_verify, join_policy);
criterion_main!(benches);
