-- nack.lua: transition LEASED -> RETRY_WAIT (due at now + delay), LEASED -> READY (delay 0, head of queue),
-- or LEASED -> DEAD (dead flag, or attempts >= the message's max_attempts). Also used for consumers that
-- disconnect. A message with its own retry policy (body fields max_attempts, backoff_base_ms) uses it. A dead
-- message with an ordering key lets the next one of its key go live (KEY_WAIT -> READY).
-- KEYS[1] <gb>ready, KEYS[2] <gb>leased, KEYS[3] <gb>delayed, KEYS[4] <gb>dead, KEYS[5] <gb>held (a first delivery's
--         lease state moves to its delivery hash first: _lib.lua unhold)
-- Built (_lib.lua key(), from ARGV[1]): each delivery <gb>dlv:<id>, body <base>msg:<id>, dead letter <gb>dead:<id>,
--         ordering key line <gb>key:<okey>; channel <base>wake
-- ARGV[1] base, ARGV[2] topic, ARGV[3] group, ARGV[4] now, ARGV[5] max_attempts, ARGV[6] dlq ttl (s),
-- ARGV[7] strict order (1|0), ARGV[8] backoff base (ms), ARGV[9] backoff multiplier, ARGV[10] backoff cap (ms),
-- then 6 per item: id, receipt, error entry (JSON object text), delay_ms (-1: backoff), dead (0|1),
-- jitter factor (drawn by the caller from [1 - jitter, 1 + jitter])
-- Returns array per item: "retry" | "ready" | "dead" | "stale", then one more element: when the earliest retry of
--         the group is due (epoch ms; concurrent groups: the head of the delayed set, strict-order groups: the
--         earliest not_before this call set), -1 when nothing waits: the node arms its timer for the group at it.
-- A note on the wake channel when a message became claimable (back to ready, or the next of an ordering key).
-- The lowest score of sorted set k (epoch ms), -1 when it is empty (the group's timer is armed there).
local function zset_head(k)
  local head = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
  if head[2] then return tonumber(head[2]) end
  return -1
end
local base, topic, group, now, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[6]
local q = group_keys(base, group, KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
local out = {}
local woke = false
local strict = ARGV[7]
local mult, cap = tonumber(ARGV[9]), tonumber(ARGV[10])
local due = -1            -- strict order: the earliest not_before set here
local delayed = false     -- something may have entered the delayed set
for i = 11, #ARGV, 6 do
  local id, receipt, entry, delay, dead = ARGV[i], ARGV[i+1], ARGV[i+2], tonumber(ARGV[i+3]), ARGV[i+4]
  local dkey = key(q.gb, 'dlv', id)
  unhold(q, id)
  if redis.call('HGET', dkey, 'receipt') == receipt and redis.call('ZREM', KEYS[2], id) == 1 then
    add_error(dkey, entry)
    local attempts = tonumber(redis.call('HGET', dkey, 'attempts') or '0')
    local maxa, bbase = policy(base, id, tonumber(ARGV[5]), tonumber(ARGV[8]))
    if dead == '1' or attempts >= maxa then
      local went = dead_letter(q, topic, id, dead == '1' and 'rejected' or 'max_attempts', now, ttl)
      if went then woke = true end
      if went == 'delayed' then delayed = true end
      out[#out + 1] = 'dead'
    else
      if delay < 0 then delay = backoff(attempts, bbase, mult, cap, tonumber(ARGV[i+5])) end
      if delay == 0 then
        redis.call('LPUSH', KEYS[1], id)
        woke = true
        out[#out + 1] = 'ready'
      else
        schedule_retry(q, id, now + delay, strict)
        if strict == '1' then
          if due < 0 or now + delay < due then due = now + delay end
        else
          delayed = true
        end
        out[#out + 1] = 'retry'
      end
    end
  else
    out[#out + 1] = 'stale'
  end
end
if woke then redis.call('PUBLISH', key(base, 'wake'), 'k') end
if delayed then due = zset_head(KEYS[3]) end
out[#out + 1] = due
return out
