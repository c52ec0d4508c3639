//! HTTP side of the server: `/healthz`, 404 for other paths, method / origin / vsn / upgrade
//! header checks on `/socket/websocket` (a bad version names 13), exactly one `Host` on
//! HTTP/1.1, `/favicon.ico`, the exact 101 answer, request-head size bound and a handshake that
//! arrives in many small TCP writes.

mod common;

use common::*;

#[test]
fn healthz_answers_200_ok() {
    let server = start_server(&[]);
    let resp = http_raw(server.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert_eq!(resp.status, 200, "{:?}", resp.status_line);
    assert!(resp.status_line.starts_with("HTTP/1.1 200"));
    assert_eq!(resp.body_text(), "ok");
}

#[test]
fn other_paths_are_404_and_closed() {
    let server = start_server(&[]);
    let port = server.port;
    // (`/` and `/index.html` are the demo page: tests/demo_page.rs.)
    for path in ["/socket", "/socket/longpoll", "/healthzz", "/index.htm", "/assets/"] {
        let mut resp = http_raw(port, format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes());
        assert_eq!(resp.status, 404, "GET {path}");
        resp.assert_error(404);
    }
    // A well-formed, authenticated upgrade on the long-poll path is still 404.
    let mut resp = http_raw(port, upgrade_request_with(port, "GET", "/socket/longpoll", &v2_query(), &[]).as_bytes());
    resp.assert_error(404);
}

#[test]
fn non_get_on_socket_path_is_400() {
    let server = start_server(&[]);
    let port = server.port;
    for method in ["POST", "PUT", "DELETE"] {
        let mut resp = http_raw(
            port,
            upgrade_request_with(port, method, "/socket/websocket", &v2_query(), &["Content-Length: 0"]).as_bytes(),
        );
        assert_eq!(resp.status, 400, "{method}");
        resp.assert_error(400);
    }
}

#[test]
fn exact_101_answer_without_subprotocol() {
    let server = start_server(&[]);
    let ws = RawWs::connect(server.port);
    // from_response checked status line, Upgrade, Connection and Sec-WebSocket-Accept.
    assert_eq!(ws.handshake.header("sec-websocket-protocol"), None, "no subprotocol was offered, none may be answered");
    assert!(ws.handshake.body.is_empty());
}

#[test]
fn missing_or_invalid_upgrade_headers_are_400() {
    let server = start_server(&[]);
    let port = server.port;
    let query = v2_query();
    let base = upgrade_request(port, &query, &[]);
    let cases = [
        ("no Upgrade header", base.replace("Upgrade: websocket\r\n", "")),
        ("Upgrade is not websocket", base.replace("Upgrade: websocket\r\n", "Upgrade: h2c\r\n")),
        ("no Sec-WebSocket-Key", base.replace(&format!("Sec-WebSocket-Key: {WS_KEY}\r\n"), "")),
        ("Sec-WebSocket-Version 8", base.replace("Sec-WebSocket-Version: 13\r\n", "Sec-WebSocket-Version: 8\r\n")),
        ("no Sec-WebSocket-Version", base.replace("Sec-WebSocket-Version: 13\r\n", "")),
    ];
    for (name, request) in cases {
        assert_ne!(request, base, "case {name} did not change the request");
        let mut resp = http_raw(port, request.as_bytes());
        assert_eq!(resp.status, 400, "{name}: {:?}", resp.status_line);
        // RFC 6455 §4.4: a version refusal names the version the server speaks.
        let names_13 = name.contains("Version");
        assert_eq!(resp.header("sec-websocket-version"), names_13.then_some("13"), "{name}");
        resp.assert_error(400);
    }
}

#[test]
fn an_http_1_1_request_needs_exactly_one_host() {
    let server = start_server(&[]);
    let port = server.port;
    let cases: [(&str, &[u8], &str); 3] = [
        ("no Host", b"GET /healthz HTTP/1.1\r\n\r\n", "missing Host header"),
        ("two Hosts", b"GET /healthz HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", "more than one Host header"),
        (
            "an upgrade without Host",
            b"GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "missing Host header",
        ),
    ];
    for (name, request, why) in cases {
        let mut resp = http_raw(port, request);
        assert_eq!((resp.status, resp.body_text()), (400, why.to_string()), "{name}");
        resp.assert_error(400);
    }
    // HTTP/1.0 has no Host requirement.
    assert_eq!(http_raw(port, b"GET /healthz HTTP/1.0\r\n\r\n").status, 200);
}

#[test]
fn favicon_answers_without_a_404() {
    let server = start_server(&[]);
    for method in ["GET", "HEAD"] {
        let resp = http_raw(server.port, format!("{method} /favicon.ico HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        assert_eq!(resp.status, 204, "{method}");
        assert_eq!(resp.header("cache-control"), Some("public, max-age=86400"));
        assert!(resp.body.is_empty());
    }
}

#[test]
fn malformed_http_is_400() {
    let server = start_server(&[]);
    let port = server.port;
    let cases: [&[u8]; 3] = [
        b"\x00\x01\x02 nonsense\r\n\r\n",
        b"GET /socket/websocket HTTP/1.1\r\nThis header has no colon\r\n\r\n",
        b"GET /socket/websocket HTTP/9\r\n\r\n",
    ];
    for request in cases {
        let mut resp = http_raw(port, request);
        assert_eq!(resp.status, 400, "request {:?}", String::from_utf8_lossy(request));
        resp.assert_error(400);
    }
}

#[test]
fn vsn_selects_the_serializer() {
    let server = start_server(&[]);
    let port = server.port;
    let tok = token(&new_sub());
    let v1_heartbeat = v1(None, Some("1"), "phoenix", "heartbeat", "{}");
    let v1_answer = v1_reply("phoenix", "1", "ok", "{}");

    // No vsn: V1, as Phoenix.
    let mut c = connect(port, &format!("token={tok}"));
    c.roundtrip(&v1_heartbeat, &v1_answer);
    // 1.0.0: V1.
    let mut c = connect(port, &format!("token={tok}&vsn=1.0.0"));
    c.roundtrip(&v1_heartbeat, &v1_answer);
    // 2.0.0: V2 (the stock phoenix.js client).
    let mut c = connect(port, &format!("token={tok}&vsn=2.0.0"));
    c.heartbeat("1");
}

#[test]
fn unknown_vsn_is_403() {
    let server = start_server(&[]);
    let port = server.port;
    let tok = token(&new_sub());
    for vsn in ["3.0.0", "abc", "0.9.0"] {
        let mut resp = http_raw(port, upgrade_request(port, &format!("vsn={vsn}&token={tok}"), &[]).as_bytes());
        assert_eq!(resp.status, 403, "vsn={vsn}");
        resp.assert_error(403);
    }
}

#[test]
fn origin_allow_list() {
    let server = start_server(&[("NEXUS_ALLOWED_ORIGINS", "https://example.com,https://chat.example.org")]);
    let port = server.port;
    for origin in ["https://evil.com", "http://example.com", "https://example.com.evil.com"] {
        let mut resp = http_raw(port, upgrade_request(port, &v2_query(), &[&format!("Origin: {origin}")]).as_bytes());
        assert_eq!(resp.status, 403, "Origin {origin}");
        resp.assert_error(403);
    }
    for origin in ["https://example.com", "https://chat.example.org"] {
        let mut ws = RawWs::from_response(http_raw(
            port,
            upgrade_request(port, &v2_query(), &[&format!("Origin: {origin}")]).as_bytes(),
        ));
        ws.heartbeat("1");
    }
    // No Origin header (non-browser clients): allowed.
    let mut ws = RawWs::connect(port);
    ws.heartbeat("1");
}

#[test]
fn any_origin_is_allowed_by_default() {
    let server = start_server(&[]);
    let port = server.port;
    let mut ws = RawWs::from_response(http_raw(
        port,
        upgrade_request(port, &v2_query(), &["Origin: https://anywhere.example"]).as_bytes(),
    ));
    ws.heartbeat("1");
}

#[test]
fn handshake_written_one_byte_at_a_time() {
    let server = start_server(&[]);
    let port = server.port;
    let request = upgrade_request(port, &v2_query(), &["Origin: https://example.com"]);
    let mut stream = std::net::TcpStream::connect(server.addr()).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    for byte in request.as_bytes() {
        std::io::Write::write_all(&mut stream, std::slice::from_ref(byte)).expect("write byte");
        std::io::Write::flush(&mut stream).expect("flush");
    }
    let mut ws = RawWs::from_response(read_response(stream));
    ws.heartbeat("1");
    // A frame split across many writes is reassembled by the server too.
    let frame = client_frame(OP_TEXT, heartbeat("2").as_bytes());
    for byte in &frame {
        ws.send_raw(std::slice::from_ref(byte));
    }
    ws.expect_text(&heartbeat_reply("2"));
}

#[test]
fn oversized_request_head_is_431_and_closed() {
    let server = start_server(&[]);
    let port = server.port;
    let padding = "a".repeat(9000);
    let request = upgrade_request(port, &v2_query(), &[&format!("X-Padding: {padding}")]);
    assert!(request.len() > 8192);
    let mut resp = http_raw(port, request.as_bytes());
    assert_eq!(resp.status, 431, "{:?}", resp.status_line);
    resp.assert_error(431);

    // A head that never ends is cut at the bound too, without waiting for the blank line.
    let mut stream = std::net::TcpStream::connect(server.addr()).expect("connect");
    let endless = format!(
        "GET /socket/websocket?{} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: {}",
        v2_query(),
        "b".repeat(10_000)
    );
    write_lenient(&mut stream, endless.as_bytes());
    let mut resp = read_response(stream);
    resp.assert_error(431);
}

#[test]
fn large_request_head_under_the_bound_is_accepted() {
    let server = start_server(&[]);
    let port = server.port;
    let base = upgrade_request(port, &v2_query(), &[]);
    let padding = "p".repeat(7000 - base.len());
    let request = upgrade_request(port, &v2_query(), &[&format!("X-Padding: {padding}")]);
    assert!(request.len() < 7100, "{}", request.len());
    let mut ws = RawWs::from_response(http_raw(port, request.as_bytes()));
    ws.heartbeat("1");
}

#[test]
fn healthy_client_keeps_working_through_bad_requests() {
    let server = start_server(&[]);
    let port = server.port;
    let topic = new_topic();
    let mut healthy = connect_v2(port, &new_sub());
    healthy.join(&topic, "1");

    let bad: Vec<Vec<u8>> = vec![
        b"\x16\x03\x01\x02\x00garbage\r\n\r\n".to_vec(),
        upgrade_request_with(port, "POST", "/socket/websocket", &v2_query(), &[]).into_bytes(),
        upgrade_request(port, "vsn=2.0.0&token=nope", &[]).into_bytes(),
        upgrade_request(port, "vsn=9&token=x", &[]).into_bytes(),
        format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "z".repeat(9000)).into_bytes(),
    ];
    for (i, request) in bad.iter().enumerate() {
        let resp = http_raw(port, request);
        assert!(resp.status >= 400, "bad request {i} got {:?}", resp.status_line);
        healthy.heartbeat(&format!("hb{i}"));
    }
    healthy.roundtrip(
        &v2(Some("1"), Some("9"), &topic, "ping", r#"{"still":"here"}"#),
        &v2_reply(Some("1"), Some("9"), &topic, "ok", r#"{"still":"here"}"#),
    );
    // The client's own connection attempts are unaffected by the refused ones.
    let mut other = connect_v2(port, &new_sub());
    other.heartbeat("1");
}
