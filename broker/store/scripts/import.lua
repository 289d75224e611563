-- import.lua: transition (none) -> READY, (none) -> RETRY_WAIT, (none) -> DEAD for records of one topic read from a
-- `broker export` file (docs/export.md). A message is queued in one group the way publish.lua queues it (a leased
-- one comes back READY, its delivery hash and attempt count kept); a dead letter is written as dead_letter() in
-- _lib.lua writes it (both through put_dead_letter), with its remaining TTL. Each op is all or nothing, and a body's
-- refs always equals the number of groups holding it (the first group creates it with refs 1, each further group
-- adds 1, as reprocess.lua does), so the state is consistent after every call, and a crash between two calls loses
-- nothing a re-run does not finish.
-- Idempotent: an op is skipped when the import ledger holds it (imported before, within the ledger TTL) or when
-- this Redis already holds its state: the group's delivery hash or dead letter, its lease or delay entry, or, for
-- a message whose body exists but was not created by an import, the body (the message lives here already).
-- KEYS[1] <base>groups SET, KEYS[2] <base>imported ZSET import ledger, member -> import time (ms):
--         "<id>" (body created by an import), "<group>/<id>" (delivery), "<group>/<id>/dead" (dead letter)
-- Built (_lib.lua key(), from ARGV[1]): the keys of the groups named by the ops (several per call, known only
--         from the file: ready, leased, delayed, dead, key:<okey> lines), each body <base>msg:<id>, delivery
--         <gb>dlv:<id>, dead letter <gb>dead:<id> (written by put_dead_letter) and idempotency key <base>idem:<key>
-- ARGV[1] base, ARGV[2] now (ms), ARGV[3] ledger TTL (ms), ARGV[4] dry run (1|0): decide only, write nothing,
-- ARGV[5..] ops, each its kind and then its fields:
--   G group
--   M group id due|"" note|"" nb (field value)*nb nd (field value)*nd
--       due: epoch ms when it becomes ready (RETRY_WAIT), "" for READY; note: error entry (JSON object text)
--       appended to the history (a lease cut by the export), nb/nd: body / delivery hash fields ("refs" excluded)
--   D group id died_at ttl_s|"" nf (field value)*nf
--   I idempotency_key id ttl_s|""
-- A note on the wake channel when anything was written.
-- Returns one verdict per op: "imported" | "present" (this Redis holds it) | "ledger" (imported before);
--         a dry run returns what a real run would.


local base, now, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local dry = ARGV[4] == '1'
local groups, ledger = KEYS[1], KEYS[2]
local cutoff = now - ttl

-- Per-key ordering (a message with a body field `key`): it joins the end of its key's line in the group (key_join
-- in _lib.lua); only the head of a line is queued (ready, or delayed when due > 0), the others wait in the line
-- until the ids before them are finished (KEY_WAIT).
local function enqueue_keyed(q, okey, id, due)
  if not key_join(q, okey, id) then return false end
  if due > 0 then
    redis.call('ZADD', q.delayed, due, id)
  else
    make_live(q, id, now)  -- a keyed publish delay (body field deliver_at) still holds it
  end
  return true
end

local function in_ledger(member)
  local at = redis.call('ZSCORE', ledger, member)
  return at ~= false and at ~= nil and tonumber(at) > cutoff
end

-- n at ARGV[i], then n (field, value) pairs: returns them as a flat list and the index after them
local function read_pairs(i)
  local n = tonumber(ARGV[i])
  local list = {}
  for j = i + 1, i + 2 * n do list[#list + 1] = ARGV[j] end
  return list, i + 1 + 2 * n
end

local function field(list, name)
  for j = 1, #list - 1, 2 do
    if list[j] == name then return list[j + 1] end
  end
  return nil
end

if not dry then redis.call('ZREMRANGEBYSCORE', ledger, '-inf', cutoff) end
local out = {}
local wrote = false
local i = 5
while i <= #ARGV do
  local kind = ARGV[i]
  if kind == 'G' then
    if redis.call('SISMEMBER', groups, ARGV[i + 1]) == 1 then
      out[#out + 1] = 'present'
    else
      if not dry then redis.call('SADD', groups, ARGV[i + 1]) end
      out[#out + 1] = 'imported'
    end
    i = i + 2
  elseif kind == 'M' then
    local group, id, due, note = ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]) or 0, ARGV[i + 4]
    local body, j = read_pairs(i + 5)
    local dlv, nxt = read_pairs(j)
    i = nxt
    local q = group_keys(base, group)
    local bkey, dkey = key(base, 'msg', id), key(q.gb, 'dlv', id)
    local has_body = redis.call('EXISTS', bkey) == 1
    if in_ledger(group .. '/' .. id) then
      out[#out + 1] = 'ledger'
    elseif redis.call('EXISTS', dkey, key(q.gb, 'dead', id)) > 0 or redis.call('ZSCORE', q.leased, id)
        or redis.call('ZSCORE', q.delayed, id) or (has_body and not in_ledger(id)) then
      out[#out + 1] = 'present'
    else
      if not dry then
        if has_body then
          redis.call('HINCRBY', bkey, 'refs', 1)
        else
          call_chunked('HSET', bkey, body)
          redis.call('HSET', bkey, 'refs', 1)
          redis.call('ZADD', ledger, now, id)
        end
        if #dlv > 0 then call_chunked('HSET', dkey, dlv) end
        if note ~= '' then add_error(dkey, note) end
        redis.call('ZADD', ledger, now, group .. '/' .. id)
        local okey = field(body, 'key')
        if okey then
          enqueue_keyed(q, okey, id, due)
        elseif due > 0 then
          redis.call('ZADD', q.delayed, due, id)
        else
          redis.call('RPUSH', q.ready, id)
        end
        wrote = true
      end
      out[#out + 1] = 'imported'
    end
  elseif kind == 'D' then
    local group, id, died, xttl = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
    local fields, nxt = read_pairs(i + 5)
    i = nxt
    local q = group_keys(base, group)
    if in_ledger(group .. '/' .. id .. '/dead') then
      out[#out + 1] = 'ledger'
    elseif redis.call('EXISTS', key(q.gb, 'dead', id), key(q.gb, 'dlv', id)) > 0 then
      out[#out + 1] = 'present'
    else
      if not dry then
        put_dead_letter(q, id, fields, died, xttl)
        redis.call('ZADD', ledger, now, group .. '/' .. id .. '/dead')
        wrote = true
      end
      out[#out + 1] = 'imported'
    end
  elseif kind == 'I' then
    local ikey = key(base, 'idem', ARGV[i + 1])
    if redis.call('EXISTS', ikey) == 1 then
      out[#out + 1] = 'present'
    else
      if not dry then
        if ARGV[i + 3] ~= '' then
          redis.call('SET', ikey, ARGV[i + 2], 'EX', ARGV[i + 3])
        else
          redis.call('SET', ikey, ARGV[i + 2])
        end
      end
      out[#out + 1] = 'imported'
    end
    i = i + 4
  else
    return redis.error_reply('ERR import.lua: unknown op ' .. tostring(kind) .. ' at ARGV[' .. i .. ']')
  end
end
if wrote then
  redis.call('PEXPIRE', ledger, ttl)
  redis.call('PUBLISH', key(base, 'wake'), 'i')  -- the groups' idle loops claim what came back READY
end
return out
