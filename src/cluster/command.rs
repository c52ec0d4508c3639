//! The server API's commands that every node must carry out (remove a member, disconnect a
//! user), as they travel between nodes: one `PUBLISH` on the cluster's command channel,
//! `<kind>|<incarnation>|<ids>` in plain text. The node that took the request carries it out
//! itself and skips its own publication.

use uuid::Uuid;

/// A server API command for every node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `user`'s sockets leave `conversation`.
    RemoveMember {
        /// The conversation.
        conversation: Uuid,
        /// The user.
        user: Uuid,
    },
    /// `user`'s sockets are closed.
    Disconnect {
        /// The user.
        user: Uuid,
    },
}

/// The command channel's name after the cluster's prefix.
pub const CHANNEL: &str = "commands";

/// The channel commands are published on.
pub fn channel(prefix: &str) -> String {
    format!("{prefix}{CHANNEL}")
}

impl Command {
    /// The publication of this command by `incarnation`.
    pub fn encode(self, incarnation: &str) -> Vec<u8> {
        match self {
            Command::RemoveMember { conversation, user } => format!("R|{incarnation}|{conversation}|{user}"),
            Command::Disconnect { user } => format!("D|{incarnation}|{user}"),
        }
        .into_bytes()
    }

    /// A publication's command and the incarnation that sent it.
    pub fn decode(bytes: &[u8]) -> Option<(Command, &str)> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (kind, rest) = text.split_once('|')?;
        // The ids are taken from the end: the incarnation (`<node id>/<µs>`) may hold a '|'.
        match kind {
            "R" => {
                let (rest, user) = rest.rsplit_once('|')?;
                let (incarnation, conversation) = rest.rsplit_once('|')?;
                let command = Command::RemoveMember {
                    conversation: Uuid::try_parse(conversation).ok()?,
                    user: Uuid::try_parse(user).ok()?,
                };
                Some((command, incarnation))
            }
            "D" => {
                let (incarnation, user) = rest.rsplit_once('|')?;
                Some((Command::Disconnect { user: Uuid::try_parse(user).ok()? }, incarnation))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        for command in [Command::RemoveMember { conversation: a, user: b }, Command::Disconnect { user: b }] {
            let bytes = command.encode("host:4000|x/17");
            assert_eq!(Command::decode(&bytes), Some((command, "host:4000|x/17")));
        }
        for bad in [&b""[..], b"R|x", b"D|x|not-a-uuid", b"X|a|b", b"\xff"] {
            assert_eq!(Command::decode(bad), None);
        }
    }
}
