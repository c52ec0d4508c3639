//! Why a connection ends: one catalog of close codes and log labels (centrifuge's
//! `disconnect.go` idea). phoenix.js reconnects after every code except 1000, so Nexus never
//! sends 1000 to a client it wants back.

/// A server-initiated close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// No bytes from the client within the idle timeout.
    Idle,
    /// Outbound queue over its byte limit: the client does not read fast enough.
    SlowConsumer,
    /// Client frame or message over the size limit.
    TooBig,
    /// Text frame that is not UTF-8.
    InvalidUtf8,
    /// RFC 6455 violation by the client.
    Protocol,
    /// The client sent a close frame; echo its code.
    Echo(u16),
    /// The server is shutting down (graceful drain): the client should reconnect elsewhere.
    GoingAway,
    /// The client kept sending over its message rate after being told.
    RateLimited,
}

impl Close {
    /// WebSocket close code.
    pub fn code(self) -> u16 {
        match self {
            Close::Idle => 1001,
            Close::SlowConsumer => 1013,
            Close::TooBig => 1009,
            Close::InvalidUtf8 => 1007,
            Close::Protocol => 1002,
            Close::Echo(code) => code,
            Close::GoingAway => 1001,
            Close::RateLimited => 1008,
        }
    }

    /// Close reason text (also the log label).
    pub fn reason(self) -> &'static str {
        match self {
            Close::Idle => "idle timeout",
            Close::SlowConsumer => "slow consumer",
            Close::TooBig => "message too big",
            Close::InvalidUtf8 => "invalid utf-8",
            Close::Protocol => "protocol error",
            Close::Echo(_) => "",
            Close::GoingAway => "going away",
            Close::RateLimited => "rate limited",
        }
    }

    /// The close for a codec error.
    pub fn from_ws(e: crate::ws::WsError) -> Close {
        match e {
            crate::ws::WsError::Protocol(_) => Close::Protocol,
            crate::ws::WsError::TooBig => Close::TooBig,
            crate::ws::WsError::InvalidUtf8 => Close::InvalidUtf8,
        }
    }
}
