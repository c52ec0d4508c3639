-- Applies one node's presence changes to one conversation, atomically, and publishes only the
-- effective ones under the conversation's next version (so every replica applies the same
-- dense sequence of versions, or sees a gap and reads a snapshot).
-- KEYS[1] p:{conv} (HASH phx_ref -> user .. online_at .. incarnation)
-- KEYS[2] pv:{conv} (the version)
-- KEYS[3] nt:<incarnation> (SET of the conversations the incarnation touched, for reaping)
-- ARGV[1] the conversation's channel, ARGV[2] the conversation id
-- ARGV[3..] '+' .. phx_ref(16) .. value, or '-' .. phx_ref(16)
-- Returns {version, change, ...}: the version after it (as text) and the effective changes.
local changes = {}
for i = 3, #ARGV do
  local op = ARGV[i]
  local ref = string.sub(op, 2, 17)
  if string.sub(op, 1, 1) == '+' then
    if redis.call('HSETNX', KEYS[1], ref, string.sub(op, 18)) == 1 then
      changes[#changes + 1] = op
    end
  elseif redis.call('HDEL', KEYS[1], ref) == 1 then
    changes[#changes + 1] = '-' .. ref
  end
end
if #changes == 0 then
  return {redis.call('GET', KEYS[2]) or '0'}
end
local version = redis.call('INCR', KEYS[2])
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('PUBLISH', ARGV[1], 'P' .. version .. '\n' .. table.concat(changes, '\n'))
table.insert(changes, 1, tostring(version))
return changes
