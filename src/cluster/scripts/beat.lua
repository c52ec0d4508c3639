-- A node's heartbeat, and the claim of the nodes that stopped beating.
-- KEYS[1] nodes (ZSET incarnation -> last beat, ms of Redis's clock)
-- ARGV[1] this incarnation, ARGV[2] the node timeout in ms, ARGV[3] this node's id .. '/'
-- Returns {missing, dead...}: missing = 1 when this incarnation was not in the set (new, or
-- reaped while cut off), then the incarnations now claimed for reaping: the silent ones and
-- this node's own earlier incarnations (a restart under the same id clears its ghosts at once).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local missing = redis.call('ZADD', KEYS[1], now, ARGV[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
local prefix = ARGV[3]
for _, incarnation in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if incarnation ~= ARGV[1] and string.sub(incarnation, 1, #prefix) == prefix then
    dead[#dead + 1] = incarnation
  end
end
local claimed = {tostring(missing)}
for _, incarnation in ipairs(dead) do
  if redis.call('ZREM', KEYS[1], incarnation) == 1 then
    claimed[#claimed + 1] = incarnation
  end
end
return claimed
