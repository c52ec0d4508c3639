//! Every bound Nexus enforces, in one place, units last in the name.
//!
//! Configurable limits (frame size, idle timeout, ...) take their *defaults* from here; the
//! values that are not worth a knob are plain constants. Each says why it has the value it has.

use std::time::Duration;

/// Default largest WebSocket frame or reassembled message a client may send.
/// The seed app's limit was "~65KB"; Phoenix itself allows 10 MB (websock_adapter), far more
/// than a chat message needs and an easy way to make a server buffer megabytes per socket.
pub const FRAME_BYTES_MAX_DEFAULT: usize = 65_536;

/// Smallest frame limit accepted from configuration: below this a join with a few params
/// would no longer fit.
pub const FRAME_BYTES_MAX_MIN: usize = 1_024;

/// Default idle timeout: a socket that sends nothing for this long is closed (1001).
/// The JS client beats every 30 s and Phoenix's transport timeout is 60 s.
pub const IDLE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);

/// Shortest idle timeout accepted from configuration: the sweep that enforces it runs every
/// [`SWEEP_INTERVAL`], so a shorter one could not be honoured.
pub const IDLE_TIMEOUT_MIN: Duration = Duration::from_secs(1);

/// Most core threads (`NEXUS_WORKERS`): core ids travel as `u16` in cross-core messages and
/// presence refs; far more than any machine this runs on has cores.
pub const WORKERS_MAX: usize = 1_024;

/// Default graceful drain (`NEXUS_DRAIN_SECS`): open sockets are closed spread over this long,
/// so clients reconnect elsewhere in a trickle instead of a stampede; well inside the 30 s an
/// orchestrator usually waits after SIGTERM.
pub const DRAIN_DEFAULT: Duration = Duration::from_secs(10);

/// Longest graceful drain accepted (`NEXUS_DRAIN_SECS`): longer than any orchestrator waits
/// before it kills a process anyway.
pub const DRAIN_MAX: Duration = Duration::from_secs(3_600);

/// Default presence coalescing window (`NEXUS_PRESENCE_BATCH_MS`): one diff per topic per
/// window instead of one per join; 5 ms is invisible to people and turns a join storm's O(N²)
/// frames into O(N) (BENCHMARKS.md, "Join storm").
pub const PRESENCE_BATCH_MS_DEFAULT: u64 = 5;

/// Longest presence window accepted: beyond a second, presence lags visibly.
pub const PRESENCE_BATCH_MS_MAX: u64 = 1_000;

/// Lifetime of the tokens `POST /dev/token` mints (development only), as long as the tokens of
/// the app backend in the integration guide Nexus follows.
pub const DEV_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// Largest HTTP request head (request line + headers) we buffer before answering 431.
/// A phoenix.js upgrade with a token in the query and in the subprotocol is ~1.5 KiB.
pub const HANDSHAKE_BYTES_MAX: usize = 8_192;

/// Most headers parsed in one request; more is answered 431.
pub const HANDSHAKE_HEADERS_MAX: usize = 64;

/// A connection that has not completed its HTTP upgrade within this time is dropped, so a
/// client dribbling headers (slowloris) cannot hold a socket forever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default most topics one socket may have joined at once (Phoenix 1.8.9's
/// `max_channels_per_transport`).
pub const CHANNELS_PER_CONN_MAX_DEFAULT: usize = 100;

/// Deepest `[`/`{` nesting accepted in a client's JSON message. The JSON parser recurses once
/// per level with no limit of its own, so a 64 KiB frame of brackets would overflow a core's
/// stack and abort the process; Phoenix messages need 2 levels (array, payload object).
pub const JSON_DEPTH_MAX: usize = 32;

/// Default messages per second one socket may send (`NEXUS_MSG_RATE`; burst: one second's
/// worth). Far above any person's client; a flood from one socket is cut without touching
/// the others. Benchmarks that drive thousands per socket set 0 (no limit).
pub const MSG_RATE_DEFAULT: u32 = 1_000;

/// Messages refused in a row for rate before the socket is closed (1008).
pub const MSG_RATE_STRIKES_MAX: u32 = 100;

/// How often a draining core closes its next slice of sockets.
pub const DRAIN_TICK: Duration = Duration::from_millis(50);

/// Default most bytes queued for one connection before it counts as a slow consumer and is
/// closed with 1013. Bounds the memory a client that stops reading can pin.
pub const OUTBOX_BYTES_MAX_DEFAULT: usize = 1 << 20;

/// Bytes read per `recv` into the per-core scratch buffer. One buffer per core, so its size
/// costs nothing per connection.
pub const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Most `recv` calls for one readiness event before the connection yields to others, so one
/// fast sender cannot starve its core.
pub const READS_PER_WAKE_MAX: usize = 4;

/// Default requests the writer thread may have queued (`NEXUS_WRITER_QUEUE`). Full → `Failed to
/// save` / `server busy` at once. Sized from latency, not memory: the writer commits ~200k
/// msg/s (BENCHMARKS.md), so a full queue is ~40 ms of waiting; a 65,536-deep queue would be
/// over 300 ms.
pub const WRITER_QUEUE_MAX_DEFAULT: usize = 8_192;

/// Most requests the writer commits in one batch (one transaction, one hand-off per core).
pub const WRITER_BATCH_MAX: usize = 1_024;

/// Capacity of each core's cross-thread mailbox, in messages (a message is a whole committed
/// batch, one presence change or state, or one HTTP response).
pub const MAILBOX_MSGS_MAX: usize = 4_096;

/// Messages one core may hold for other cores whose mailboxes are full before it counts as
/// congested: then every core refuses new joins (`server busy`) until it drains to half of
/// this. Joins are what create cross-core traffic; leaves and closes are never refused or
/// dropped, and are bounded by the joins already made. 16 full mailboxes' worth: reached only
/// when a core has stopped draining for a long while.
pub const CROSS_CORE_OVERFLOW_MSGS_MAX: usize = 16 * MAILBOX_MSGS_MAX;

/// First and longest pause of a non-core thread (the writer, a reader) waiting for room in a
/// full mailbox; the pause doubles in between. Short first, since a core drains its mailbox
/// in microseconds; capped so a stalled core costs the waiting thread little CPU.
pub const MAILBOX_BLOCKING_PAUSE_MIN: Duration = Duration::from_micros(20);
/// See [`MAILBOX_BLOCKING_PAUSE_MIN`].
pub const MAILBOX_BLOCKING_PAUSE_MAX: Duration = Duration::from_millis(5);

/// How often each core sweeps its connections for idle and handshake deadlines. One coarse
/// sweep per core instead of one timer (and its memory) per connection.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(250);

/// How often core 0 gives the heap's free pages back to the kernel ([`crate::server::sys`]'s
/// `trim_heap`): often enough that RSS follows the memory in use within a minute after a burst,
/// rarely enough that the walk over the allocator's free lists costs nothing measurable.
pub const HEAP_TRIM_INTERVAL: Duration = Duration::from_secs(60);

/// File descriptors kept back from `RLIMIT_NOFILE` for the database, its threads and logs; the
/// rest, less [`FDS_PER_CORE`] per core, may be connections.
pub const FDS_RESERVED: u64 = 64;

/// File descriptors each core holds besides connections: its listener, its ring, the two ends
/// of its wake socket pair, its spare descriptor, its timer, and slack.
pub const FDS_PER_CORE: u64 = 8;

/// Back-off after `accept` fails for lack of file descriptors, so a full table never spins.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

const _: () = assert!(FRAME_BYTES_MAX_MIN <= FRAME_BYTES_MAX_DEFAULT);
const _: () = assert!(IDLE_TIMEOUT_MIN.as_millis() >= 4 * SWEEP_INTERVAL.as_millis());
const _: () = assert!(IDLE_TIMEOUT_MIN.as_secs() <= IDLE_TIMEOUT_DEFAULT.as_secs());
const _: () = assert!(PRESENCE_BATCH_MS_DEFAULT <= PRESENCE_BATCH_MS_MAX);
const _: () = assert!(DRAIN_DEFAULT.as_secs() <= DRAIN_MAX.as_secs());
const _: () = assert!(WORKERS_MAX <= u16::MAX as usize + 1);
const _: () = assert!(CROSS_CORE_OVERFLOW_MSGS_MAX >= 2 * MAILBOX_MSGS_MAX);
const _: () = assert!(WRITER_BATCH_MAX <= WRITER_QUEUE_MAX_DEFAULT);
const _: () = assert!(HANDSHAKE_BYTES_MAX <= READ_CHUNK_BYTES);

/// After the server's last bytes (an HTTP error, a close frame), how long it keeps reading and
/// discarding input so the client sees a clean FIN instead of a reset.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Bytes coalesced into one `send` from a connection's queue.
pub const WRITE_BATCH_BYTES: usize = 256 * 1024;

/// Listen backlog per core listener (the kernel caps it at `net.core.somaxconn`, 4096 by
/// default): a connect storm queues in the kernel instead of being refused.
pub const LISTEN_BACKLOG: i32 = 4_096;

/// The writer does background work (moving `recent` rows into the indexed history) after this
/// long without requests.
pub const WRITER_IDLE: Duration = Duration::from_millis(200);

/// Conversations one merge step moves from memory into the indexed history per
/// [`MERGE_SLICE_PACE`] since the previous step. With a step per writer batch, this sets how
/// often each conversation's index leaf is rewritten (once per sweep) and so how many rows
/// share each leaf write.
pub const MERGE_STEP_CONVERSATIONS: usize = 16;

/// See [`MERGE_STEP_CONVERSATIONS`]: the sweep covers 16 conversations per 5 ms, however the
/// steps fall (10,000 conversations ≈ 3 s).
pub const MERGE_SLICE_PACE: Duration = Duration::from_millis(5);

/// Most conversations in one step (a rare step at a low rate), within [`MERGE_STEP_ROWS`].
pub const MERGE_SLICE_CONVERSATIONS_MAX: usize = 4_096;

/// Committed rows per merge step while busy: ties the sweep's pace to the message rate, not to
/// how many (possibly tiny) batches carried them.
pub const MERGE_STEP_EVERY_ROWS: usize = 1_024;

/// A merge step runs at least this often while rows wait. Each step is a transaction (WAL
/// pages to write and, later, checkpoint), so at low rates steps are rare and large (see
/// [`MERGE_SLICE_PACE`]): at 100 msg/s one step a second, not one per commit.
pub const MERGE_STEP_EVERY: Duration = Duration::from_secs(1);

/// Most rows one merge step moves: bounds the step's time, so commits keep their latency.
pub const MERGE_STEP_ROWS: usize = 4_096;

/// Rows a merge step moves before it may stop early for waiting requests (~1 ms of work).
pub const MERGE_PREEMPT_MIN_ROWS: usize = 256;

/// Merged rows deleted from `recent` per step (a range delete on the rowid table).
pub const MERGE_DELETE_ROWS: usize = 2_048;

/// Unmerged rows kept in memory above which the writer runs extra merge steps per batch.
pub const MERGE_BACKLOG_ROWS: usize = 1_000_000;

/// Longest the writer spends on merge steps between two batches (or in one idle tick).
pub const MERGE_STEP_BUDGET: Duration = Duration::from_millis(20);

/// History requests queued for the reader thread; full → 503.
pub const READER_QUEUE_MAX: usize = 1_024;

/// History page size when the request gives no `limit`.
pub const HISTORY_LIMIT_DEFAULT: usize = 50;
/// Largest `limit` a history request may ask for.
pub const HISTORY_LIMIT_MAX: usize = 200;
/// The answer to a history `limit` outside 1..=[`HISTORY_LIMIT_MAX`] (a unit test keeps the
/// number in it equal to the constant).
pub const HISTORY_LIMIT_INVALID: &str = "limit must be an integer from 1 to 200";

/// How often the checkpointer looks at the WAL. Often, so that under load it copies committed
/// pages into the database file before the WAL reaches [`WAL_AUTOCHECKPOINT_PAGES`] and the
/// writer checkpoints itself: 50 ms left ~3 ms commits in the writer several times a second at
/// 75k msg/s; 10 ms took ack p99 from 8.9 to 5.0 ms there, and the writer alone from 231k to
/// 241k rows/s (commit p99 15 → 9 ms).
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(10);

/// New WAL frames (pages) that make a checkpoint due: 256 pages = 1 MiB, a few milliseconds
/// of writing at full load (so saturated runs checkpoint every look, as before), minutes at a
/// few messages a second.
pub const CHECKPOINT_MIN_FRAMES: u64 = 256;

/// Longest a written frame waits for its checkpoint (the backstop at low rates): about one
/// checkpoint, one pair of fsyncs, a second while anything is written.
pub const CHECKPOINT_BACKSTOP: Duration = Duration::from_secs(1);

/// WAL size (pages of [`DB_PAGE_BYTES`]) at which the writer checkpoints by itself: a safety
/// net if the checkpointer thread falls behind. 2,000 pages ≈ 8 MiB of WAL.
pub const WAL_AUTOCHECKPOINT_PAGES: i64 = 2_000;

/// SQLite page size: the OS page, so a page write is one block write.
pub const DB_PAGE_BYTES: u32 = 4_096;

/// Size the WAL file is truncated back to after a checkpoint lets it restart, so a burst does
/// not leave a huge file behind.
pub const WAL_SIZE_LIMIT_BYTES: i64 = 64 * 1024 * 1024;

/// How long the writer and readers wait on a locked database before failing (a checkpoint or
/// a migration by another process holds it briefly).
pub const DB_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the checkpointer waits on a lock before skipping one round (it retries every
/// [`CHECKPOINT_INTERVAL`], so skipping costs nothing).
pub const CHECKPOINT_BUSY_TIMEOUT: Duration = Duration::from_millis(100);

/// How often a core retries messages for another core whose mailbox was full.
pub const MAILBOX_RETRY: Duration = Duration::from_millis(1);

/// Default PostgreSQL timeout (`NEXUS_DB_TIMEOUT`): connecting at start-up, each statement on
/// the server (`statement_timeout`, `lock_timeout`), and unacknowledged writes on the socket
/// (TCP user timeout), so a dead or unreachable database never hangs a thread for longer.
pub const DB_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);

/// Default PostgreSQL history reader threads (`NEXUS_DB_READERS`), one connection each.
pub const DB_READERS_DEFAULT: usize = 2;

/// Most PostgreSQL history reader threads.
pub const DB_READERS_MAX: usize = 64;

/// Default PostgreSQL writer lanes (`NEXUS_DB_WRITERS`), one connection each. One PostgreSQL
/// backend executes one batch at a time; two lanes, on disjoint conversations, let the
/// database execute one batch while the other waits for its fsync or its next batch.
pub const DB_WRITERS_DEFAULT: usize = 2;

/// Most PostgreSQL writer lanes.
pub const DB_WRITERS_MAX: usize = 16;

/// Default least time between the starts of two commits of a PostgreSQL writer lane under a
/// steady load (`NEXUS_DB_COMMIT_GAP_MS`; 0 commits as soon as anything is queued). A commit
/// costs PostgreSQL ~0.2 ms of CPU whatever its size (measured: ~2,500 commits/s of two
/// messages each took 0.48 vCPU at 5k msg/s); the gap turns those into fewer, larger commits
/// (0.26–0.31 vCPU there) and adds at most itself to an ack. Figures in tuning.md. SQLite
/// commits cost little and keep committing at once.
pub const DB_COMMIT_GAP_MS_DEFAULT: u64 = 3;

/// Largest `NEXUS_DB_COMMIT_GAP_MS`.
pub const DB_COMMIT_GAP_MS_MAX: u64 = 100;

/// Bound on one reconnect attempt while the database is down: the writer fails batches at once
/// between attempts, and an attempt this short keeps `storage unavailable` answers within a
/// second even when the database host does not answer at all.
pub const DB_RECONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// First and longest pause between reconnect attempts to PostgreSQL or Redis (doubling in
/// between, [`crate::backoff::Backoff`]): quick recovery after a restart, at most one attempt a
/// second during an outage.
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// See [`RECONNECT_BACKOFF_MIN`].
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Bound on connecting to Redis and on each command (a pipeline of publications, a
/// subscription's confirmation): a slower Redis counts as down, and the database covers for it.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

/// A batch whose connection is lost is answered within this of being sent: the writer tries to
/// learn whether it committed until then, and otherwise answers it `storage unavailable` (and
/// keeps looking it up afterwards). Short enough that senders hear back within a second when
/// the database is gone; long enough for a reconnect and a look-up when only the connection
/// was.
pub const DB_OUTCOME_WAIT: Duration = Duration::from_millis(800);

/// Longest a byte sent to the database may stay unacknowledged by its host before the
/// connection is given up (TCP user timeout). A live server's host acknowledges at once
/// however busy the server is; silence this long means the host or the network is gone. One
/// retransmission fits in it (the minimum retransmission timeout is 200 ms). Linux notices
/// at its next retransmission timer, measured here ~0.45 s later, so a commit cut off this
/// way fails ~0.75 s after it was sent, inside [`DB_OUTCOME_WAIT`].
pub const DB_UNACKED_MAX: Duration = Duration::from_millis(300);

/// Poll interval while waiting for an old backend to end or the database to come back.
pub const DB_OUTCOME_POLL: Duration = Duration::from_millis(50);

/// Batches of unknown outcome kept for a later look-up; beyond it the oldest is forgotten
/// (its messages, if committed, are in history but were never broadcast) and logged.
pub const DB_UNRESOLVED_BATCHES_MAX: usize = 64;

/// How long a batch token is kept (far longer than any outcome look-up takes), and how often
/// old ones are deleted.
pub const DB_TOKEN_KEEP: Duration = Duration::from_secs(3_600);
/// See [`DB_TOKEN_KEEP`].
pub const DB_TOKEN_PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Most batch tokens deleted at a time (a full chunk brings the next one forward), so pruning
/// never holds the writer for more than a few milliseconds.
pub const DB_TOKEN_PRUNE_ROWS: usize = 2_000;

/// Default key prefix of a cluster's Redis keys and channels (`NEXUS_REDIS_PREFIX`): several
/// clusters (or test runs) can share one Redis under different prefixes.
pub const REDIS_PREFIX_DEFAULT: &str = "nx:";

/// Default time after which a silent node is declared dead and its presence removed
/// everywhere (`NEXUS_NODE_TIMEOUT`); nodes beat every fifth of it.
pub const NODE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(15);

/// Shortest `NEXUS_NODE_TIMEOUT`: below a second, a busy Redis or a GC-less pause of a few
/// hundred milliseconds would already reap a live node.
pub const NODE_TIMEOUT_MIN: Duration = Duration::from_secs(1);

/// Default wait before a gap in a conversation's `seq`s is read from PostgreSQL
/// (`NEXUS_GAP_WAIT_MS`): a publication overtaken by a later one usually arrives well
/// within it, and a real loss is repaired this late.
pub const GAP_WAIT_MS_DEFAULT: u64 = 25;

/// Longest `NEXUS_GAP_WAIT_MS`.
pub const GAP_WAIT_MS_MAX: u64 = 10_000;

/// Default period of the catch-up read of every watched conversation's head
/// (`NEXUS_CATCHUP_MS`): the bound on how late a message whose publication was lost without a
/// later one to reveal the gap (a node that died between commit and publish) reaches members.
pub const CATCHUP_MS_DEFAULT: u64 = 1_000;

/// Catch-up period while Redis is down: then the database is the only way other nodes'
/// messages arrive, so this is their delivery delay.
pub const CATCHUP_DOWN: Duration = Duration::from_millis(200);

/// Shortest and longest `NEXUS_CATCHUP_MS`.
pub const CATCHUP_MS_MIN: u64 = 10;
/// See [`CATCHUP_MS_MIN`].
pub const CATCHUP_MS_MAX: u64 = 60_000;

/// Default committed batches waiting to be published to Redis (`NEXUS_PUBLISH_QUEUE`); when
/// full, a batch is not published (counted) and other nodes read it from PostgreSQL.
pub const PUBLISH_QUEUE_DEFAULT: usize = 4_096;

/// Default messages a core holds per conversation behind a gap (`NEXUS_HOLD_MAX`); beyond it
/// they are dropped and read again from PostgreSQL.
pub const HOLD_MAX_DEFAULT: usize = 4_096;

/// Most rows one gap-fill or catch-up read returns; a longer gap is read in several.
pub const FILL_ROWS_MAX: usize = 1_000;

/// Most conversations whose heads one catch-up read asks for.
pub const CATCHUP_HEADS_MAX: usize = 1_000;

/// Reads the cores may have queued for the gap-fill thread; when full, a core asks again at
/// its next check.
pub const FILLER_QUEUE_MAX: usize = 4_096;

/// Default most missed messages a rejoin recovers (`NEXUS_RECOVERY_MAX`); beyond it the join
/// answers `recovered: false` and the client pages the history API instead.
pub const RECOVERY_MAX_DEFAULT: usize = 1_000;

/// Largest `NEXUS_RECOVERY_MAX`: a recovery is one read and one burst of pushes to one socket.
pub const RECOVERY_MAX_MAX: usize = 10_000;

/// Live messages one recovering join may hold while its read is in flight; beyond it the
/// join answers `recovered: false` (nothing old is pushed, live messages follow the reply).
pub const RECOVERY_HOLD_MAX: usize = 1_024;

/// Recovery reads one core keeps waiting while the readers' queue is full (a reconnect storm);
/// beyond it a rejoin is answered `recovered: false` at once.
pub const RECOVERY_BACKLOG_MAX: usize = 65_536;

/// Longest a stopping cluster node waits to remove its presence from Redis before it exits.
pub const RETIRE_WAIT: Duration = Duration::from_secs(2);

/// Presence requests the owner cores may have queued for the Redis presence thread (one per
/// conversation per presence window at most); when full, the changes apply on this node only
/// and are resynced once Redis keeps up.
pub const PRESENCE_QUEUE_MAX: usize = 16_384;

/// Presence publications a replica keeps while its snapshot is being read; beyond it they
/// are dropped, and the version gap after the snapshot reads another.
pub const PRESENCE_EARLY_MAX: usize = 1_024;

/// Watch/unwatch requests the cores may have queued for the Redis subscriber; one per first
/// join and last leave of a conversation on a core.
pub const WATCH_QUEUE_MAX: usize = 65_536;

const _: () = assert!(DB_UNACKED_MAX.as_millis() < DB_OUTCOME_WAIT.as_millis() && DB_OUTCOME_WAIT.as_millis() < 1_000);
const _: () = assert!(DB_RECONNECT_TIMEOUT.as_millis() <= DB_OUTCOME_WAIT.as_millis());
const _: () = assert!(RECONNECT_BACKOFF_MIN.as_millis() <= RECONNECT_BACKOFF_MAX.as_millis());

// --- Private conversations (docs/protocol.md, "Private conversations") ----------------------

/// Default longest wait for the join proxy's answer (`NEXUS_JOIN_PROXY_TIMEOUT`); the join
/// waits that long at most, then is refused with `authorization unavailable`.
pub const JOIN_PROXY_TIMEOUT_DEFAULT: Duration = Duration::from_secs(2);

/// Bounds of `NEXUS_JOIN_PROXY_TIMEOUT`: a socket reads nothing while its join waits.
pub const JOIN_PROXY_TIMEOUT_MIN: Duration = Duration::from_millis(10);
/// See [`JOIN_PROXY_TIMEOUT_MIN`].
pub const JOIN_PROXY_TIMEOUT_MAX: Duration = Duration::from_secs(30);

/// Default lifetime of the join proxy's allow and deny answers (`NEXUS_JOIN_PROXY_CACHE`).
pub const JOIN_PROXY_CACHE_DEFAULT: Duration = Duration::from_secs(60);

/// Most (user, conversation) answers the join proxy's cache keeps; past it the expired ones
/// go first, then arbitrary ones (a miss only costs one more backend call).
pub const JOIN_PROXY_CACHE_ENTRIES_MAX: usize = 100_000;

/// Threads calling the join proxy (blocking HTTP, one call each at a time).
pub const JOIN_PROXY_WORKERS: usize = 4;

/// Backend calls that may wait for a proxy thread; when full, a join that needs a call is
/// refused at once with `authorization unavailable`.
pub const JOIN_PROXY_QUEUE_MAX: usize = 4_096;

/// Largest answer body read from the join proxy (only its status matters).
pub const JOIN_PROXY_BODY_MAX: u64 = 64 * 1024;

/// Shortest `NEXUS_API_KEY`: a guessable key opens every conversation.
pub const API_KEY_BYTES_MIN: usize = 16;
