//! Topic names and their placement on cores.
//!
//! Only `chat:<uuid>` topics exist. The conversation id is the topic's identity (the UUID is
//! case-insensitive), while frames echo the topic exactly as each client spelled it.

use uuid::Uuid;

use crate::ids::parse_canonical_uuid;

/// Prefix of every chat topic.
pub const TOPIC_PREFIX: &str = "chat:";

/// The conversation id of a `chat:<uuid>` topic; `None` for any other topic.
pub fn parse_topic(topic: &str) -> Option<Uuid> {
    topic.strip_prefix(TOPIC_PREFIX).and_then(parse_canonical_uuid)
}

/// The core that owns a conversation's shared state (presence): a pure function of the id,
/// so every core computes the same owner without asking anyone.
pub fn owner_core(conversation: Uuid, cores: usize) -> usize {
    let (hi, lo) = conversation.as_u64_pair();
    // UUIDv4/v7 low bits are random; fold both halves so any version spreads.
    ((hi ^ lo.rotate_left(17)) % cores.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics() {
        let id = "0195F1B2-7c3a-7d4e-8f00-123456789abc";
        assert_eq!(parse_topic(&format!("chat:{id}")), Uuid::try_parse(id).ok());
        assert_eq!(parse_topic("room:lobby"), None);
        assert_eq!(parse_topic("chat:nope"), None);
        assert_eq!(parse_topic(&format!("Chat:{id}")), None);
    }

    #[test]
    fn owners_spread() {
        let mut counts = [0usize; 2];
        for _ in 0..1000 {
            counts[owner_core(Uuid::new_v4(), 2)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 400), "{counts:?}");
    }
}
