-- promote.lua: transition RETRY_WAIT -> READY for entries whose due time has passed (retries, delayed publishes).
-- Exactly once on N nodes: ZREM and RPUSH happen in one step.
-- KEYS[1] <gb>delayed, KEYS[2] <gb>ready
-- Built: nothing (no per-message key; the wake channel comes from the caller)
-- ARGV[1] now, ARGV[2] limit, ARGV[3] wake channel "<prefix>:{<topic>}:wake" (TopicKeys.wake)
-- Returns {number promoted, due time (epoch ms) of the new head of the delayed set, -1 when it is empty}: the
--         caller's timer for this group is armed at that time (broker/node/dispatch.py)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #ids > 0 then
  call_chunked('ZREM', KEYS[1], ids)
  call_chunked('RPUSH', KEYS[2], ids)
  redis.call('PUBLISH', ARGV[3], 'r')
end
return {#ids, zset_head(KEYS[1])}
