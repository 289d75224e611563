-- repair_key.lua: transition KEY_WAIT -> READY for the head of an ordering key's line that is in no state at all
-- (not ready, leased or delayed: a damaged store; `broker diagnose --repair`). Checked and repaired in one atomic
-- step, so a head that a broker moves meanwhile is never queued twice. A head whose body is gone is dropped from
-- the line and the next one goes live instead.
-- KEYS[1] <gb>key:<okey> LIST, KEYS[2] <gb>ready, KEYS[3] <gb>leased, KEYS[4] <gb>delayed
-- Built (_lib.lua key(), from ARGV[1]): the head's body <base>msg:<id>, the next one's body; channel <base>wake
-- ARGV[1] base, ARGV[2] group, ARGV[3] now (epoch ms), ARGV[4] "check" (report only) | "repair"
-- Returns 1 when the line was stuck (and, with "repair", is moving again), else 0
local base, now = ARGV[1], tonumber(ARGV[3])
local q = group_keys(base, ARGV[2], KEYS[2], KEYS[3], KEYS[4])
local head = redis.call('LINDEX', KEYS[1], 0)
if not head then return 0 end
if redis.call('ZSCORE', KEYS[3], head) or redis.call('ZSCORE', KEYS[4], head) or redis.call('LPOS', KEYS[2], head) then
  return 0
end
if ARGV[4] == 'repair' then
  if redis.call('EXISTS', key(base, 'msg', head)) == 1 then
    redis.call('RPUSH', KEYS[2], head)
  else
    redis.call('LPOP', KEYS[1])
    local nxt = redis.call('LINDEX', KEYS[1], 0)
    if nxt then make_live(q, nxt, now) end
  end
  redis.call('PUBLISH', key(base, 'wake'), 'k')
end
return 1
