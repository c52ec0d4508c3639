-- Makes one incarnation's metas of one conversation exactly a given set: after Redis lost
-- them (a restart) or the node applied changes while Redis was down, and with an empty set to
-- reap a dead incarnation. Publishes the effective changes like apply.lua.
-- KEYS[1] p:{conv}, KEYS[2] pv:{conv}, KEYS[3] nt:<incarnation>
-- ARGV[1] channel, ARGV[2] conversation id, ARGV[3] the incarnation
-- ARGV[4..] '+' .. phx_ref(16) .. value: the metas it must have
-- Returns {version, change, ...} as apply.lua.
local want = {}
for i = 4, #ARGV do
  want[string.sub(ARGV[i], 2, 17)] = ARGV[i]
end
local incarnation = ARGV[3]
local changes = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local ref, value = all[i], all[i + 1]
  -- value = user(36) .. online_at(27) .. incarnation
  if string.sub(value, 64) == incarnation and not want[ref] then
    redis.call('HDEL', KEYS[1], ref)
    changes[#changes + 1] = '-' .. ref
  end
end
for ref, op in pairs(want) do
  if redis.call('HSETNX', KEYS[1], ref, string.sub(op, 18)) == 1 then
    changes[#changes + 1] = op
  end
end
if next(want) ~= nil then
  redis.call('SADD', KEYS[3], ARGV[2])
end
if #changes == 0 then
  return {redis.call('GET', KEYS[2]) or '0'}
end
local version = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[1], 'P' .. version .. '\n' .. table.concat(changes, '\n'))
table.insert(changes, 1, tostring(version))
return changes
