//! The browser demo page (issue 7): `GET /` serves the embedded chat page, which imports the
//! vendored phoenix client from `/assets/phoenix.mjs`; `POST /dev/token` exists only with
//! `--dev-tokens` (404 otherwise) and its tokens work on the socket; with
//! `NEXUS_ALLOWED_ORIGINS` the page's own origin may open a socket and a foreign one may not.

mod common;

use sonic_rs::JsonValueTrait;

use common::*;

fn origin_of(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

#[test]
fn the_page_and_its_client_are_served_from_the_binary() {
    let server = start_server(&[]);
    let page = http_get(server.port, "/", None);
    assert_eq!(page.status, 200);
    assert_eq!(page.header("content-type"), Some("text/html; charset=utf-8"));
    let html = String::from_utf8(page.body).expect("UTF-8 page");
    assert!(
        html.contains(r#"import { Socket, Presence } from "/assets/phoenix.mjs";"#),
        "page does not import the client"
    );
    assert!(html.contains("authToken: state.token"), "the page must pass the token as authToken, not in the URL");

    let js = http_get(server.port, "/assets/phoenix.mjs", None);
    assert_eq!(js.status, 200);
    assert_eq!(js.header("content-type"), Some("text/javascript; charset=utf-8"));
    let js = String::from_utf8(js.body).expect("UTF-8 module");
    assert!(js.contains("export {") && js.contains("Presence") && js.contains("Socket"));
    assert!(!js.contains("sourceMappingURL"), "no dangling source map reference");

    assert_eq!(http_request(server.port, "POST", "/", None).status, 405);
    assert_eq!(http_get(server.port, "/assets/nope.js", None).status, 404);
}

#[test]
fn dev_tokens_are_off_by_default() {
    let server = start_server(&[]);
    let r = http_request(server.port, "POST", "/dev/token", None);
    assert_eq!(r.status, 404);
    assert!(!server.logs().contains("DEV TOKENS ARE ON"));
}

#[test]
fn dev_tokens_mint_working_tokens_when_on_and_say_so() {
    let server = start_server(&[("NEXUS_DEV_TOKENS", "1")]);
    assert!(server.logs().contains("DEV TOKENS ARE ON"), "stderr:\n{}", server.logs());
    let sub = new_sub();
    let r = http_request(server.port, "POST", &format!("/dev/token?sub={sub}"), None);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = parse(std::str::from_utf8(&r.body).expect("UTF-8"));
    assert_eq!(v["sub"].as_str(), Some(sub.as_str()));
    let token = v["token"].as_str().expect("token").to_string();
    let mut c = connect(server.port, &format!("vsn=2.0.0&token={token}"));
    c.heartbeat("1");

    let random = http_request(server.port, "POST", "/dev/token", None);
    let v = parse(std::str::from_utf8(&random.body).expect("UTF-8"));
    assert_ne!(v["sub"].as_str(), Some(sub.as_str()));
    assert_eq!(http_request(server.port, "POST", "/dev/token?sub=alice", None).status, 400);
    assert_eq!(http_request(server.port, "GET", "/dev/token", None).status, 405);
}

#[test]
fn the_pages_own_origin_may_connect_a_foreign_one_may_not() {
    // The port is only known once the server runs, so allow the origin by host pattern the way
    // an operator would list it (`//host:port`); a second server proves the foreign refusal.
    let probe = start_server(&[]);
    let port = probe.port;
    drop(probe);
    let allowed = format!("//127.0.0.1:{port}");
    let _server = start_server(&[("PORT", &port.to_string()), ("NEXUS_ALLOWED_ORIGINS", &allowed)]);
    let query = format!("vsn=2.0.0&token={}", token(&new_sub()));
    let own = origin_of(port);
    let mut c =
        try_connect(port, &query, &[("Origin", &own)], &[]).unwrap_or_else(|e| panic!("own origin refused: {e:?}"));
    c.heartbeat("1");
    match try_connect(port, &query, &[("Origin", "https://evil.example")], &[]) {
        Err(ConnectError::Status(403)) => {}
        Err(ConnectError::Status(s)) => panic!("foreign origin: expected 403, got {s}"),
        Err(ConnectError::Other(e)) => panic!("foreign origin: expected 403, got {e}"),
        Ok(_) => panic!("foreign origin: expected 403, got 101"),
    }
}
