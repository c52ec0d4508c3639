//! Why a connection ends: one catalog (centrifuge's `disconnect.go` idea). Each entry has its
//! WebSocket close code, the reason text sent in the close frame and logged, and the label
//! `/metrics` uses (`nexus_closes_total{reason=...}`). phoenix.js reconnects after every code
//! except 1000, so no entry sends 1000 to a client Nexus wants back (only an echo of the
//! client's own 1000 does).

/// A server-initiated close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// No bytes from the client within the idle timeout.
    Idle,
    /// Outbound queue over its byte limit: the client does not read fast enough.
    SlowConsumer,
    /// Client frame or message over the size limit.
    TooBig,
    /// Text that is not UTF-8.
    InvalidUtf8,
    /// RFC 6455 violation by the client.
    Protocol,
    /// The client sent a close frame; its code is echoed.
    Client(u16),
    /// The server is shutting down (graceful drain): the client should reconnect elsewhere.
    GoingAway,
    /// The client kept sending over its message rate after being told.
    RateLimited,
    /// The app backend asked for the user's sockets to be closed (server API); phoenix.js
    /// reconnects, and the join policy decides what it may rejoin.
    Disconnected,
}

/// One catalog entry.
struct Entry {
    /// WebSocket close code (for [`Close::Client`], the client's code is echoed instead).
    code: u16,
    /// Reason text in the close frame and the log line.
    reason: &'static str,
    /// Label in metrics.
    label: &'static str,
}

/// The catalog, in [`Close::index`] order.
const CATALOG: [Entry; Close::KINDS] = [
    Entry { code: 1001, reason: "idle timeout", label: "idle" },
    Entry { code: 1013, reason: "slow consumer", label: "slow_consumer" },
    Entry { code: 1009, reason: "message too big", label: "too_big" },
    Entry { code: 1007, reason: "invalid utf-8", label: "invalid_utf8" },
    Entry { code: 1002, reason: "protocol error", label: "protocol" },
    Entry { code: 1000, reason: "", label: "client" },
    Entry { code: 1001, reason: "going away", label: "going_away" },
    Entry { code: 1008, reason: "rate limited", label: "rate_limited" },
    Entry { code: 1008, reason: "disconnected by the server", label: "disconnected" },
];

impl Close {
    /// Number of catalog entries.
    pub const KINDS: usize = 9;

    /// One close of each kind, in catalog order (for metrics).
    pub const ALL: [Close; Close::KINDS] = [
        Close::Idle,
        Close::SlowConsumer,
        Close::TooBig,
        Close::InvalidUtf8,
        Close::Protocol,
        Close::Client(1000),
        Close::GoingAway,
        Close::RateLimited,
        Close::Disconnected,
    ];

    /// Position in the catalog.
    pub const fn index(self) -> usize {
        match self {
            Close::Idle => 0,
            Close::SlowConsumer => 1,
            Close::TooBig => 2,
            Close::InvalidUtf8 => 3,
            Close::Protocol => 4,
            Close::Client(_) => 5,
            Close::GoingAway => 6,
            Close::RateLimited => 7,
            Close::Disconnected => 8,
        }
    }

    /// WebSocket close code.
    pub fn code(self) -> u16 {
        match self {
            Close::Client(code) => code,
            _ => CATALOG[self.index()].code,
        }
    }

    /// Reason text for the close frame and the log.
    pub fn reason(self) -> &'static str {
        CATALOG[self.index()].reason
    }

    /// Label for metrics.
    pub fn label(self) -> &'static str {
        CATALOG[self.index()].label
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_is_consistent() {
        for (i, why) in Close::ALL.into_iter().enumerate() {
            assert_eq!(why.index(), i, "{why:?}");
            assert!(!why.label().is_empty());
            // phoenix.js does not reconnect after 1000: only the client's own echo may carry it.
            assert!(why.code() != 1000 || matches!(why, Close::Client(_)), "{why:?}");
        }
        assert_eq!(Close::Client(4001).code(), 4001);
        assert_eq!((Close::Idle.code(), Close::Idle.reason()), (1001, "idle timeout"));
        assert_eq!((Close::SlowConsumer.code(), Close::SlowConsumer.label()), (1013, "slow_consumer"));
        let labels: std::collections::HashSet<_> = Close::ALL.iter().map(|c| c.label()).collect();
        assert_eq!(labels.len(), Close::KINDS, "labels are unique");
    }
}
