-- drop_bodyless.lua: transition READY | RETRY_WAIT | LEASED -> (removed) for queue entries whose message body is
-- gone (a damaged store: nothing can ever be delivered for them; `broker diagnose --repair`). Each id is checked
-- and removed in one atomic step, so an entry whose body exists is never touched. Every key is declared in KEYS.
-- KEYS[1] <gb>ready, KEYS[2] <gb>delayed, KEYS[3] <gb>leased, KEYS[4] <gb>held,
-- KEYS[3+2i] <base>msg:<ARGV[i]> (the body), KEYS[4+2i] <gb>dlv:<ARGV[i]> (its delivery state in this group)
-- ARGV[1], ARGV[2], ... the ids (ARGV[i] goes with KEYS[3+2i] and KEYS[4+2i])
-- Returns the number of ids removed (those whose body was still gone)
local n = 0
for i = 1, #ARGV do
  local id = ARGV[i]
  if redis.call('EXISTS', KEYS[3 + 2 * i]) == 0 then
    redis.call('LREM', KEYS[1], 0, id)
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZREM', KEYS[3], id)
    redis.call('HDEL', KEYS[4], id)
    redis.call('DEL', KEYS[4 + 2 * i])
    n = n + 1
  end
end
return n
