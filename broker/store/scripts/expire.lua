-- expire.lua: transition LEASED -> RETRY_WAIT | DEAD for leases whose deadline has passed, and for leases
-- held by broker nodes that stopped heartbeating (orphan sweep: no need to wait for the deadline).
-- Safe on N nodes at once: each id is removed from the lease set in the same step that reschedules it, so a
-- message gets exactly one retry schedule however many nodes sweep together.
-- KEYS[1] <gb>leased, KEYS[2] <gb>delayed, KEYS[3] <gb>dead, KEYS[4] <gb>ready
-- ARGV[1] base, ARGV[2] topic, ARGV[3] group, ARGV[4] now, ARGV[5] max_attempts, ARGV[6] dlq ttl (s),
-- ARGV[7] limit, ARGV[8] K = number of dead node ids, ARGV[9..8+K] dead node ids, ARGV[9+K] strict order (1|0),
-- ARGV[10+K..] retry delay (ms) for attempt 1, 2, ... (jittered by the caller)
-- Returns {expired_to_retry, expired_to_dead, of which orphaned by a dead node}
local base, topic, group, now, maxa, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local limit, k = tonumber(ARGV[7]), tonumber(ARGV[8])
local strict = ARGV[9 + k]
local delay0 = 9 + k
local gb = base .. 'g:' .. group .. ':'
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
local why = {}
for _, id in ipairs(ids) do why[id] = 'lease expired' end
local orphaned = 0
if k > 0 then
  local dead_nodes = {}
  for i = 9, 8 + k do dead_nodes[ARGV[i]] = true end
  for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    if not why[id] then
      local node = redis.call('HGET', gb .. 'dlv:' .. id, 'node')
      if node and dead_nodes[node] then
        ids[#ids + 1] = id
        why[id] = 'broker node ' .. node .. ' died holding the lease'
        orphaned = orphaned + 1
      end
    end
  end
end
local retried, dead = 0, 0
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local dkey = gb .. 'dlv:' .. id
  local d = redis.call('HMGET', dkey, 'attempts', 'consumer')
  local attempts = tonumber(d[1] or '0')
  add_error(dkey, '{"attempt":' .. attempts .. ',"error":' .. cjson.encode(why[id]) .. ',"at":' .. now ..
    ',"consumer":' .. cjson.encode(d[2] or '') .. '}')
  if attempts >= maxa then
    dead_letter(base, gb, KEYS[3], topic, group, id, 'max_attempts', now, ttl)
    dead = dead + 1
  else
    local delay = tonumber(ARGV[delay0 + attempts] or ARGV[#ARGV])
    schedule_retry(KEYS[4], KEYS[2], dkey, id, now + delay, strict)
    retried = retried + 1
  end
end
return {retried, dead, orphaned}
