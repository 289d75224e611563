-- promote.lua: transition RETRY_WAIT -> READY for entries whose due time has passed (retries, delayed publishes).
-- A retry (the message was delivered before: it has a delivery hash) goes to the head of the ready list, in due
-- order, as a nack with delay 0 does: it is older than the backlog, and its backoff is its wait, not the backlog's.
-- A delayed publish (never delivered) joins the tail, as if published at its due time.
-- Exactly once on N nodes: ZREM and the push happen in one step.
-- KEYS[1] <gb>delayed, KEYS[2] <gb>ready
-- Built (_lib.lua key(), from ARGV[4]): each delivery <gb>dlv:<id> (read: does it exist)
-- ARGV[1] now, ARGV[2] limit, ARGV[3] wake channel "<prefix>:{<topic>}:wake" (TopicKeys.wake), ARGV[4] base,
-- ARGV[5] group
-- Returns {number promoted, due time (epoch ms) of the new head of the delayed set, -1 when it is empty}: the
--         caller's timer for this group is armed at that time (broker/node/dispatch.py)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #ids > 0 then
  local q = group_keys(ARGV[4], ARGV[5], KEYS[2], nil, KEYS[1])
  local retries, fresh = {}, {}
  for i = #ids, 1, -1 do  -- latest due first: LPUSH leaves the earliest due at the head
    local id = ids[i]
    if redis.call('EXISTS', key(q.gb, 'dlv', id)) == 1 then
      retries[#retries + 1] = id
    else
      fresh[#fresh + 1] = id  -- latest due first here too: reversed below
    end
  end
  for i = 1, math.floor(#fresh / 2) do fresh[i], fresh[#fresh + 1 - i] = fresh[#fresh + 1 - i], fresh[i] end
  call_chunked('ZREM', KEYS[1], ids)
  if #retries > 0 then call_chunked('LPUSH', KEYS[2], retries) end
  if #fresh > 0 then call_chunked('RPUSH', KEYS[2], fresh) end
  redis.call('PUBLISH', ARGV[3], 'r')
end
return {#ids, zset_head(KEYS[1])}
