//! Client tokens: HS256 JWTs whose `sub` is the user id. The only home of `jsonwebtoken`.
//!
//! Rules (docs/protocol.md, "Token rules"): header `alg` must be `HS256` (`none`, RS*, ES*, HS384 refused);
//! signature checked with the raw bytes of `JWT_SECRET`; `sub` required and a canonical
//! hyphenated UUID; `exp` and `nbf` enforced when present (leeway configurable, 0 by
//! default); other claims and header fields (`kid`, `jku`, ...) ignored.
//!
//! Under the `token` join policy (docs/protocol.md, "Private conversations") a token also
//! carries grants: its `chats` claim (an array of conversation ids) and its `chat` claim (one
//! id). A join token is a token whose `chat` names the conversation joined, whose `sub` is the
//! socket's user, and which has an `exp`.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::parse_canonical_uuid;

/// Why a token was refused. Every variant is answered 403; the variant is for the log.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token in the query or subprotocol.
    #[error("no token")]
    Missing,
    /// Signature, algorithm, encoding, `exp` or `nbf` check failed.
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    /// `sub` missing or not a canonical UUID.
    #[error("token sub is not a UUID")]
    BadSubject,
    /// `chats` is not an array of conversation ids, or `chat` is not one.
    #[error("token chats/chat claim is not a conversation id")]
    BadGrant,
    /// A join token for another user or another conversation, or without `chat`.
    #[error("join token is not for this user and conversation")]
    OtherJoin,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
}

/// The claims read under the `token` join policy.
#[derive(Deserialize)]
struct GrantClaims {
    sub: Option<String>,
    #[serde(default)]
    chats: Option<Vec<String>>,
    #[serde(default)]
    chat: Option<String>,
}

/// Who a valid token is for, and (under the `token` policy) which conversations it grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user (`sub`).
    pub user: Uuid,
    /// Conversations granted by `chats` and `chat` (empty unless grants were asked for).
    pub grants: Vec<Uuid>,
}

#[derive(Serialize)]
struct MintClaims {
    sub: String,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    chats: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    chat: Option<String>,
}

/// What a minted token grants under the `token` join policy.
#[derive(Debug, Default, Clone)]
pub struct Grant {
    /// Conversations for the socket token's `chats` claim.
    pub chats: Vec<Uuid>,
    /// The one conversation of a join token (`chat`).
    pub chat: Option<Uuid>,
}

/// Verifies tokens against one secret. Built once at start-up and shared read-only.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    /// Join tokens: the same rules, plus a required `exp`.
    join_validation: Validation,
    /// Read the grant claims (the `token` join policy); otherwise they are ignored, whatever
    /// they hold.
    grants: bool,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier for `secret` with `leeway_secs` of clock tolerance on `exp`/`nbf`.
    pub fn new(secret: &[u8], leeway_secs: u64) -> Verifier {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.required_spec_claims.clear();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.leeway = leeway_secs;
        let mut join_validation = validation.clone();
        join_validation.set_required_spec_claims(&["exp"]);
        Verifier { key: DecodingKey::from_secret(secret), validation, join_validation, grants: false }
    }

    /// The same verifier, reading the grant claims too (the `token` join policy).
    pub fn with_grants(mut self) -> Verifier {
        self.grants = true;
        self
    }

    /// The user id of a valid token.
    pub fn verify(&self, token: Option<&str>) -> Result<Uuid, AuthError> {
        let token = token.ok_or(AuthError::Missing)?;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)?;
        subject(data.claims.sub.as_deref())
    }

    /// The user of a valid token, with its grants when the verifier reads them.
    pub fn identify(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        if !self.grants {
            return self.verify(token).map(|user| Identity { user, grants: Vec::new() });
        }
        let token = token.ok_or(AuthError::Missing)?;
        let claims = jsonwebtoken::decode::<GrantClaims>(token, &self.key, &self.validation)?.claims;
        let user = subject(claims.sub.as_deref())?;
        let grants = claims.chats.unwrap_or_default().into_iter().chain(claims.chat);
        let grants = grants.map(|c| parse_canonical_uuid(&c).ok_or(AuthError::BadGrant)).collect::<Result<_, _>>()?;
        Ok(Identity { user, grants })
    }

    /// Checks a join token: valid, with an `exp`, for `user` and `conversation`.
    pub fn verify_join(&self, token: &str, user: Uuid, conversation: Uuid) -> Result<(), AuthError> {
        let claims = jsonwebtoken::decode::<GrantClaims>(token, &self.key, &self.join_validation)?.claims;
        let chat = claims.chat.as_deref().and_then(parse_canonical_uuid);
        if subject(claims.sub.as_deref())? != user || chat != Some(conversation) {
            return Err(AuthError::OtherJoin);
        }
        Ok(())
    }
}

fn subject(sub: Option<&str>) -> Result<Uuid, AuthError> {
    sub.and_then(parse_canonical_uuid).ok_or(AuthError::BadSubject)
}

/// Mints an HS256 token for `sub` valid for `ttl`, with `grant`'s claims (for `nexus token`,
/// the dev token endpoint and tests).
pub fn mint(secret: &[u8], sub: Uuid, ttl: Duration, grant: &Grant) -> Result<String, AuthError> {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = MintClaims {
        sub: sub.to_string(),
        iat: now,
        exp: now + ttl.as_secs(),
        chats: grant.chats.iter().map(Uuid::to_string).collect(),
        chat: grant.chat.map(|c| c.to_string()),
    };
    Ok(jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn round_trip() {
        let sub = Uuid::new_v4();
        let token = mint(SECRET, sub, Duration::from_secs(60), &Grant::default()).expect("mint");
        assert_eq!(Verifier::new(SECRET, 0).verify(Some(&token)).expect("valid"), sub);
        assert!(Verifier::new(b"other secret", 0).verify(Some(&token)).is_err());
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let granting =
            mint(SECRET, sub, Duration::from_secs(60), &Grant { chats: vec![a], chat: Some(b) }).expect("mint");
        let identity = Verifier::new(SECRET, 0).with_grants().identify(Some(&granting)).expect("valid");
        assert_eq!(identity, Identity { user: sub, grants: vec![a, b] });
        assert!(Verifier::new(SECRET, 0).verify_join(&granting, sub, b).is_ok());
        assert!(matches!(Verifier::new(SECRET, 0).verify_join(&granting, sub, a), Err(AuthError::OtherJoin)));
        assert!(Verifier::new(SECRET, 0).identify(Some(&granting)).expect("valid").grants.is_empty());
    }

    #[test]
    fn refusals() {
        let v = Verifier::new(SECRET, 0);
        assert!(matches!(v.verify(None), Err(AuthError::Missing)));
        assert!(v.verify(Some("garbage")).is_err());
        let key = EncodingKey::from_secret(SECRET);
        let enc = |h: Header, c: serde_json_like::Claims| jsonwebtoken::encode(&h, &c, &key).expect("encode");
        let now = jsonwebtoken::get_current_timestamp();
        let sub = Uuid::new_v4().to_string();
        let hs384 = enc(Header::new(Algorithm::HS384), serde_json_like::claims(Some(&sub), None, None));
        assert!(v.verify(Some(&hs384)).is_err());
        let expired = enc(Header::default(), serde_json_like::claims(Some(&sub), Some(now - 10), None));
        assert!(v.verify(Some(&expired)).is_err());
        let future = enc(Header::default(), serde_json_like::claims(Some(&sub), None, Some(now + 60)));
        assert!(v.verify(Some(&future)).is_err());
        let no_sub = enc(Header::default(), serde_json_like::claims(None, None, None));
        assert!(matches!(v.verify(Some(&no_sub)), Err(AuthError::BadSubject)));
        let simple = enc(Header::default(), serde_json_like::claims(Some(&sub.replace('-', "")), None, None));
        assert!(matches!(v.verify(Some(&simple)), Err(AuthError::BadSubject)));
        let ok = enc(Header::default(), serde_json_like::claims(Some(&sub.to_uppercase()), None, None));
        assert!(v.verify(Some(&ok)).is_ok());
        // alg "none": header {"alg":"none"}, empty signature.
        let none = format!("eyJhbGciOiJub25lIn0.{}.", ok.split('.').nth(1).expect("payload"));
        assert!(v.verify(Some(&none)).is_err());
    }

    mod serde_json_like {
        #[derive(serde::Serialize)]
        pub struct Claims {
            #[serde(skip_serializing_if = "Option::is_none")]
            sub: Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            exp: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            nbf: Option<u64>,
        }
        pub fn claims(sub: Option<&str>, exp: Option<u64>, nbf: Option<u64>) -> Claims {
            Claims { sub: sub.map(str::to_string), exp, nbf }
        }
    }
}
