-- nack.lua: transition LEASED -> RETRY_WAIT (due at now + delay), LEASED -> READY (delay 0, head of queue),
-- or LEASED -> DEAD (dead flag, or attempts >= max_attempts). Also used for consumers that disconnect.
-- KEYS[1] <gb>ready, KEYS[2] <gb>leased, KEYS[3] <gb>delayed, KEYS[4] <gb>dead
-- ARGV[1] base, ARGV[2] topic, ARGV[3] group, ARGV[4] now, ARGV[5] max_attempts, ARGV[6] dlq ttl (s),
-- ARGV[7] strict order (1|0), then 5 per item: id, receipt, error entry (JSON object text), delay_ms, dead (0|1)
-- Returns array per item: "retry" | "ready" | "dead" | "stale"
local base, topic, group, now, maxa, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local gb = base .. 'g:' .. group .. ':'
local out = {}
local strict = ARGV[7]
for i = 8, #ARGV, 5 do
  local id, receipt, entry, delay, dead = ARGV[i], ARGV[i+1], ARGV[i+2], tonumber(ARGV[i+3]), ARGV[i+4]
  local dkey = gb .. 'dlv:' .. id
  if redis.call('HGET', dkey, 'receipt') == receipt and redis.call('ZREM', KEYS[2], id) == 1 then
    add_error(dkey, entry)
    local attempts = tonumber(redis.call('HGET', dkey, 'attempts') or '0')
    if dead == '1' then
      dead_letter(base, gb, KEYS[4], topic, group, id, 'rejected', now, ttl)
      out[#out + 1] = 'dead'
    elseif attempts >= maxa then
      dead_letter(base, gb, KEYS[4], topic, group, id, 'max_attempts', now, ttl)
      out[#out + 1] = 'dead'
    elseif delay <= 0 then
      redis.call('LPUSH', KEYS[1], id)
      out[#out + 1] = 'ready'
    else
      schedule_retry(KEYS[1], KEYS[3], dkey, id, now + delay, strict)
      out[#out + 1] = 'retry'
    end
  else
    out[#out + 1] = 'stale'
  end
end
return out
