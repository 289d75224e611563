-- expire.lua: transition LEASED -> RETRY_WAIT | DEAD for leases whose deadline has passed, and for leases
-- held by broker nodes that stopped heartbeating (orphan sweep: no need to wait for the deadline).
-- A dead message with an ordering key lets the next one of its key go live (KEY_WAIT -> READY).
-- Safe on N nodes at once: each id is removed from the lease set in the same step that reschedules it, so a
-- message gets exactly one retry schedule however many nodes sweep together.
-- KEYS[1] <gb>leased, KEYS[2] <gb>delayed, KEYS[3] <gb>dead, KEYS[4] <gb>ready, KEYS[5] <gb>held (a first delivery's
--         lease state moves to its delivery hash first: _lib.lua unhold)
-- Built (_lib.lua key(), from ARGV[1]): each delivery <gb>dlv:<id>, body <base>msg:<id>, dead letter <gb>dead:<id>,
--         ordering key line <gb>key:<okey>; channel <base>wake
-- ARGV[1] base, ARGV[2] topic, ARGV[3] group, ARGV[4] now, ARGV[5] max_attempts, ARGV[6] dlq ttl (s),
-- ARGV[7] limit, ARGV[8] K = number of dead node ids, ARGV[9..8+K] dead node ids, ARGV[9+K] strict order (1|0),
-- ARGV[10+K] backoff base (ms), ARGV[11+K] backoff multiplier, ARGV[12+K] backoff cap (ms),
-- ARGV[13+K..] jitter factors (drawn by the caller from [1 - jitter, 1 + jitter]), used in turn so that leases
-- expiring together do not all retry together. A message with its own retry policy (body fields) uses it.
-- Returns {expired_to_retry, expired_to_dead, of which orphaned by a dead node, deadline (epoch ms) of the lease
--         set's new head, -1 when it is empty}: the caller's timer for this group is armed at that time
-- The lowest score of sorted set k (epoch ms), -1 when it is empty (the group's timer is armed there).
local function zset_head(k)
  local head = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
  if head[2] then return tonumber(head[2]) end
  return -1
end
local base, topic, group, now, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[6]
local limit, k = tonumber(ARGV[7]), tonumber(ARGV[8])
local strict = ARGV[9 + k]
local bbase0, mult, cap = tonumber(ARGV[10 + k]), tonumber(ARGV[11 + k]), tonumber(ARGV[12 + k])
local u0, nu = 12 + k, #ARGV - 12 - k
local q = group_keys(base, group, KEYS[4], KEYS[1], KEYS[2], KEYS[3], KEYS[5])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
local why = {}
for _, id in ipairs(ids) do why[id] = 'lease expired' end
local orphaned = 0
if k > 0 then
  local dead_nodes = {}
  for i = 9, 8 + k do dead_nodes[ARGV[i]] = true end
  for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    if not why[id] then
      local _, node = lease_of(q, id)
      if node and dead_nodes[node] then
        ids[#ids + 1] = id
        why[id] = 'broker node ' .. node .. ' died holding the lease'
        orphaned = orphaned + 1
      end
    end
  end
end
local retried, dead = 0, 0
local woke = false
for n, id in ipairs(ids) do
  unhold(q, id)
  redis.call('ZREM', KEYS[1], id)
  local dkey = key(q.gb, 'dlv', id)
  local d = redis.call('HMGET', dkey, 'attempts', 'consumer')
  local attempts = tonumber(d[1] or '0')
  add_error(dkey, error_entry(attempts, why[id], now, d[2] or ''))
  local maxa, bbase = policy(base, id, tonumber(ARGV[5]), bbase0)
  if attempts >= maxa then
    if dead_letter(q, topic, id, 'max_attempts', now, ttl) then woke = true end
    dead = dead + 1
  else
    local delay = backoff(attempts, bbase, mult, cap, tonumber(ARGV[u0 + 1 + (n - 1) % nu]))
    schedule_retry(q, id, now + delay, strict)
    retried = retried + 1
  end
end
if woke then redis.call('PUBLISH', key(base, 'wake'), 'k') end
return {retried, dead, orphaned, zset_head(KEYS[1])}
