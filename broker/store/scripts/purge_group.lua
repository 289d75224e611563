-- purge_group.lua: transition READY / RETRY_WAIT / KEY_WAIT -> (deleted by an operator): `broker group purge`
-- empties a group's queue; with ARGV[4] = 'group' also LEASED / DEAD -> (deleted): `broker group delete` removes
-- the group from the topic (first call) and everything it held, so later publishes no longer store for it.
-- Each removed message drops its delivery state and this group's reference to the body (the body goes with the last
-- group, as after an ack); a removed head of an ordering key takes the messages waiting behind it along. Leased
-- messages are left alone by a purge (their consumers may still ack them), and so are the messages waiting behind a
-- leased head. At most ARGV[3] ids per call, so Redis is never blocked long: the caller calls again while more = 1.
-- KEYS[1] <gb>ready, KEYS[2] <gb>delayed, KEYS[3] <gb>leased, KEYS[4] <gb>dead (index), KEYS[5] <gb>acked,
-- KEYS[6] <base>groups, KEYS[7] <gb>held (first deliveries' leases)
-- Built (_lib.lua key(), from ARGV[1]): each message's body <base>msg:<id>, its delivery <gb>dlv:<id>, its ordering
-- key line <gb>key:<okey>, each dead letter <gb>dead:<id>
-- ARGV[1] topic base "<prefix>:{<topic>}:" (TopicKeys.base), ARGV[2] group, ARGV[3] most ids this call removes,
-- ARGV[4] 'queue' (purge) | 'group' (delete)
-- Returns {ready, delayed, waiting, leased, dead, more}: how many this call removed from each, more = 1 while
-- something is left to remove (call again)
local base, group, budget, whole = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] == 'group'
local gb = key(base, 'g', group, '')
if whole then redis.call('SREM', KEYS[6], group) end
local counts = {0, 0, 0, 0, 0}
local gone = {}

-- One live message of this group: its delivery, its reference to the body, and the messages of its ordering key
-- waiting behind it (it is the head of that line).
local function drop(id)
  redis.call('DEL', key(gb, 'dlv', id))
  redis.call('HDEL', KEYS[7], id)
  local okey = redis.call('HGET', key(base, 'msg', id), 'key')
  release_body(base, id, gone)
  if okey and okey ~= '' then
    local line = key(gb, 'key', okey)
    for _, w in ipairs(redis.call('LRANGE', line, 0, -1)) do
      if w ~= id then
        redis.call('DEL', key(gb, 'dlv', w))
        release_body(base, w, gone)
        counts[3] = counts[3] + 1
      end
    end
    redis.call('DEL', line)
  end
end

local ids = redis.call('LRANGE', KEYS[1], 0, budget - 1)
if #ids > 0 then redis.call('LTRIM', KEYS[1], #ids, -1) end
for _, id in ipairs(ids) do drop(id) end
counts[1] = #ids
budget = budget - #ids

local function drain_zset(k, slot)
  if budget <= 0 then return end
  local members = redis.call('ZRANGE', k, 0, budget - 1)
  if #members > 0 then call_chunked('ZREM', k, members) end
  for _, id in ipairs(members) do drop(id) end
  counts[slot] = #members
  budget = budget - #members
end
drain_zset(KEYS[2], 2)
if whole then
  drain_zset(KEYS[3], 4)
  if budget > 0 then
    local dead = redis.call('ZRANGE', KEYS[4], 0, budget - 1)
    for _, id in ipairs(dead) do redis.call('DEL', key(gb, 'dead', id)) end
    if #dead > 0 then call_chunked('ZREM', KEYS[4], dead) end
    counts[5] = #dead
  end
end
if #gone > 0 then call_chunked('DEL', false, gone) end

local left = redis.call('LLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])
if whole then
  left = left + redis.call('ZCARD', KEYS[3]) + redis.call('ZCARD', KEYS[4])
  if left == 0 then redis.call('DEL', KEYS[5], KEYS[7]) end
end
counts[6] = left > 0 and 1 or 0
return counts
