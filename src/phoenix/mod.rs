//! The Phoenix Channels wire format: V1 (objects) and V2 (arrays) JSON serializers and the V2
//! binary push layout. Sans-IO; the only home of `sonic-rs`.

mod binary;
mod json;
mod serializer;

pub use binary::{decode_binary_push, BinaryPush};
pub use json::{nests_deeper_than, string_field, write_str};
pub use serializer::{decode, encode, encode_around, DecodeError, Inbound, Outbound, Vsn};

/// Reply `{"status":"ok","response":{}}` response body.
pub const EMPTY: &[u8] = b"{}";
