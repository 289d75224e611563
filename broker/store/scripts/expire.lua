-- expire.lua: transition LEASED -> RETRY_WAIT | DEAD for leases whose deadline has passed.
-- Safe on N nodes at once: each id is removed from the lease set in the same step that reschedules it.
-- KEYS[1] <gb>leased, KEYS[2] <gb>delayed, KEYS[3] <gb>dead
-- ARGV[1] base, ARGV[2] topic, ARGV[3] group, ARGV[4] now, ARGV[5] max_attempts, ARGV[6] dlq ttl (s),
-- ARGV[7] limit, ARGV[8..] retry delay (ms) for attempt 1, 2, ... (jittered by the caller)
-- Returns {expired_to_retry, expired_to_dead}
local base, topic, group, now, maxa, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local gb = base .. 'g:' .. group .. ':'
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[7]))
local retried, dead = 0, 0
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local dkey = gb .. 'dlv:' .. id
  local d = redis.call('HMGET', dkey, 'attempts', 'consumer')
  local attempts = tonumber(d[1] or '0')
  add_error(dkey, '{"attempt":' .. attempts .. ',"error":"lease expired","at":' .. now ..
    ',"consumer":' .. cjson.encode(d[2] or '') .. '}')
  if attempts >= maxa then
    dead_letter(base, gb, KEYS[3], topic, group, id, 'max_attempts', now, ttl)
    dead = dead + 1
  else
    local delay = tonumber(ARGV[7 + attempts] or ARGV[#ARGV])
    redis.call('ZADD', KEYS[2], now + delay, id)
    retried = retried + 1
  end
end
return {retried, dead}
