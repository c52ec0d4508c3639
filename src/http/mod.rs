//! Sans-IO HTTP/1.1: the bounded request-head parser for the WebSocket upgrade and the few
//! plain endpoints, Origin checks, and response bytes. The only home of `httparse`.

pub mod assets;
pub mod origin;
pub mod request;
pub mod response;

pub use request::{parse_head, route, ApiAction, ApiRequest, Head, HistoryRequest, HttpError, Route, Upgrade};
