-- promote.lua: transition RETRY_WAIT -> READY for entries whose due time has passed (retries, delayed publishes).
-- A first retry (delivered once: attempts 1 in its delivery hash) goes to the head of the ready list, in due order,
-- as a nack with delay 0 does: it is older than the backlog, and its backoff is its wait, not the backlog's.
-- Everything else joins the tail: a delayed publish (never delivered), as if published at its due time; a message
-- that failed twice or more, which is poison or has its downstream down, so it queues behind the backlog like a new
-- message and cannot take every turn (a handler breaker's half-open trial would otherwise retry the same message
-- until it is dead-lettered).
-- Exactly once on N nodes: ZREM and the push happen in one step.
-- KEYS[1] <gb>delayed, KEYS[2] <gb>ready
-- Built (_lib.lua key(), from ARGV[4]): each delivery <gb>dlv:<id> (read: its attempts)
-- ARGV[1] now, ARGV[2] limit, ARGV[3] wake channel "<prefix>:{<topic>}:wake" (TopicKeys.wake), ARGV[4] base,
-- ARGV[5] group
-- ARGV[6], ARGV[7] optional (one Redis, not a cluster): the channel every node's wake-up listener subscribes to and the
--         one the sweeping node's listener alone subscribes to (keys.py listeners_channel, listener_channel). Given,
--         the note "r" goes out only when a listener other than the sweeping node's is subscribed (as in publish.lua):
--         the sweeping node wakes its own delivery loop from this reply, and on one node under load, where a group's
--         timer fires every few milliseconds, a note per step was a write Redis made and a read the node made for
--         nothing.
-- Returns {number promoted, due time (epoch ms) of the new head of the delayed set, -1 when it is empty}: the
--         caller's timer for this group is armed at that time (broker/node/dispatch.py)
-- The lowest score of sorted set k (epoch ms), -1 when it is empty (the group's timer is armed there).
local function zset_head(k)
  local head = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
  if head[2] then return tonumber(head[2]) end
  return -1
end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #ids > 0 then
  local q = group_keys(ARGV[4], ARGV[5], KEYS[2], nil, KEYS[1])
  local first, rest = {}, {}
  for i = #ids, 1, -1 do  -- latest due first: LPUSH leaves the earliest due at the head
    local id = ids[i]
    if redis.call('HGET', key(q.gb, 'dlv', id), 'attempts') == '1' then
      first[#first + 1] = id
    else
      rest[#rest + 1] = id  -- latest due first here too: reversed below
    end
  end
  for i = 1, math.floor(#rest / 2) do rest[i], rest[#rest + 1 - i] = rest[#rest + 1 - i], rest[i] end
  call_chunked('ZREM', KEYS[1], ids)
  if #first > 0 then call_chunked('LPUSH', KEYS[2], first) end
  if #rest > 0 then call_chunked('RPUSH', KEYS[2], rest) end
  local note = true
  if ARGV[7] then
    local c = redis.call('PUBSUB', 'NUMSUB', ARGV[6], ARGV[7])
    note = c[2] - c[4] > 0
  end
  if note then redis.call('PUBLISH', ARGV[3], 'r') end
end
return {#ids, zset_head(KEYS[1])}
