-- _snapshot.lua: no transition (it only reads; hence the leading underscore, like _lib.lua): one group of one
-- topic at one moment, for `broker export`, its ordering-key lines included. Every non-empty key line has its
-- first message live (ready, leased or delayed), so the lines are found from the live messages' bodies (field
-- `key`) in the same atomic step that reads the queues: no line born a moment earlier can be missed. Lines named in
-- ARGV (found by a SCAN: also a damaged line whose first message is in no state) are read too.
-- Cost: one HGET per live message of the group (about a microsecond each in Redis), in one step.
-- KEYS[1] <gb>leased ZSET, KEYS[2] <gb>ready LIST, KEYS[3] <gb>delayed ZSET, KEYS[4] <gb>dead ZSET
-- Built (_lib.lua key(), from ARGV[1] and ARGV[2]): each body <base>msg:<id>, each ordering key line <gb>key:<okey>
-- ARGV[1] base, ARGV[2] group, ARGV[3..] more ordering key lines of the group to read (full key names)
-- Returns {leased {id, deadline, ...}, ready {id, ...}, delayed {id, due, ...}, dead {id, died_at, ...},
--          lines {{id, ...}, ...}} (the lines in key-name order, each in its order)
local base = ARGV[1]
local q = group_keys(base, ARGV[2], KEYS[2], KEYS[1], KEYS[3], KEYS[4])
local leased = redis.call('ZRANGE', q.leased, 0, -1, 'WITHSCORES')
local ready = redis.call('LRANGE', q.ready, 0, -1)
local delayed = redis.call('ZRANGE', q.delayed, 0, -1, 'WITHSCORES')
local dead = redis.call('ZRANGE', q.dead, 0, -1, 'WITHSCORES')
local names, seen = {}, {}
local function note(line)
  if not seen[line] then
    seen[line] = true
    names[#names + 1] = line
  end
end
local function keyed(id)
  local okey = redis.call('HGET', key(base, 'msg', id), 'key')
  if okey and okey ~= '' then note(key(q.gb, 'key', okey)) end
end
for i = 1, #leased, 2 do keyed(leased[i]) end
for i = 1, #ready do keyed(ready[i]) end
for i = 1, #delayed, 2 do keyed(delayed[i]) end
for i = 3, #ARGV do note(ARGV[i]) end
table.sort(names)
local lines = {}
for i, line in ipairs(names) do lines[i] = redis.call('LRANGE', line, 0, -1) end
return {leased, ready, delayed, dead, lines}
