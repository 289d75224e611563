-- _depths.lua: no transition (it only reads; hence the leading underscore, like _lib.lua): every group of one topic
-- at one moment, for `broker stats` and the web console: the lengths of its four queues and the publish time of the
-- message at the head of its ready list. One call per topic instead of six commands per group (a refresh of 200
-- topics of 3 groups is 200 calls in one pipeline, not 3,600 commands in three): the client's work per command, not
-- Redis's, is what a refresh costs.
-- KEYS[1] <base>groups SET
-- Built (_lib.lua key(), from ARGV[1] and the groups read from KEYS[1]): each group's ready, leased, delayed and dead,
-- and the body <base>msg:<id> of each ready list's head
-- ARGV[1] base
-- Returns {group, ready, leased, delayed, dead, head published_at (epoch ms; -1: nothing ready, or no body), ...},
--         the groups in name order
local base = ARGV[1]
local groups = redis.call('SMEMBERS', KEYS[1])
table.sort(groups)
local out = {}
for _, group in ipairs(groups) do
  local q = group_keys(base, group)
  local head = redis.call('LINDEX', q.ready, 0)
  local at = -1
  if head then
    at = tonumber(redis.call('HGET', key(base, 'msg', head), 'published_at')) or -1
  end
  out[#out + 1] = group
  out[#out + 1] = redis.call('LLEN', q.ready)
  out[#out + 1] = redis.call('ZCARD', q.leased)
  out[#out + 1] = redis.call('ZCARD', q.delayed)
  out[#out + 1] = redis.call('ZCARD', q.dead)
  out[#out + 1] = at
end
return out
