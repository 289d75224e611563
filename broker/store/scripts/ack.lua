-- ack.lua: transition LEASED -> ACKED for N deliveries of one group. An acked message with an ordering key lets
-- the next message of its key go live (KEY_WAIT -> READY).
-- With the audit record on (retention.acked_audit_max > 0), each ack is also noted in <gb>acked (id -> acked_at),
-- trimmed to the newest max entries and to the last ttl seconds.
-- A first delivery (held: _lib.lua, "First deliveries") is acked by deleting its field of <gb>held and its lease
-- (one HDEL and one ZREM for the whole batch); a later one by deleting its delivery hash and its lease.
-- KEYS[1]  <gb>leased ZSET, KEYS[2] <gb>acked ZSET (audit record), KEYS[3] <gb>ready LIST, KEYS[4] <gb>delayed
--          ZSET (where the next message of an ordering key goes live), KEYS[5] <gb>held HASH
-- Built (_lib.lua key(), from ARGV[1]): each delivery <gb>dlv:<id>, body <base>msg:<id>, ordering key line
--          <gb>key:<okey>; channel <base>wake
-- ARGV[1]  base, ARGV[2] group, ARGV[3] now (epoch ms), ARGV[4] audit max (0: off), ARGV[5] audit ttl (s),
--          then pairs: id, receipt
-- Returns  array of 1 (acked) | 2 (acked, and the next message of its ordering key went live) | 3 (acked, and the
--          next message of its ordering key went to the delayed set: its publish delay runs) | 0 (stale: not
--          leased, or leased under another receipt)
local base, group = ARGV[1], ARGV[2]
-- now (ARGV[3]) and the audit settings are parsed only where used (tonumber() is a strtod, ~0.3 us of Redis CPU):
-- now for an ordering key's next message, the audit ttl with the audit record on.
local audit = ARGV[4] ~= '0' and tonumber(ARGV[4]) or 0
local now
local q = group_keys(base, group, KEYS[3], KEYS[1], KEYS[4], nil, KEYS[5])
local out = {}            -- one outcome per pair, in order
local woke = false
local acked = 0
local gone = {}           -- delivery hashes and bodies to delete: one DEL for the whole batch
local unheld, u = {}, 0   -- held first deliveries acked: one HDEL and one ZREM for the whole batch
local ids, n_ids = {}, 0
for i = 6, #ARGV, 2 do n_ids = n_ids + 1; ids[n_ids] = ARGV[i] end
local held                -- n -> the held value of the n-th id (false: not a held first delivery)
if n_ids <= 1000 then
  held = n_ids > 0 and redis.call('HMGET', KEYS[5], unpack(ids)) or {}
else
  held = {}
  for s = 1, n_ids, 1000 do
    local part = redis.call('HMGET', KEYS[5], unpack(ids, s, math.min(s + 999, n_ids)))
    for j = 1, #part do held[s + j - 1] = part[j] end
  end
end
-- First pass: which deliveries the receipts hold, and their leases released (ZREM, HDEL: writes that free memory
-- come first, so at maxmemory an ack still runs: Redis refuses a script whose first write could grow memory).
local done = {}           -- ids acked in this call (an id twice in one batch is acked once)
local okeys = {}          -- n -> ordering key ('' none) of each acked item
for n, id in ipairs(ids) do
  local receipt = ARGV[5 + 2 * n]
  local v = not done[id] and held[n]
  if v then
    local r, _, _, k = held_fields(v)
    if r == receipt then
      okeys[n] = k
      u = u + 1; unheld[u] = id
      done[id] = true
    end
  elseif not done[id] then
    local dkey = key(q.gb, 'dlv', id)
    local d = redis.call('HMGET', dkey, 'receipt', 'key')
    if d[1] == receipt and redis.call('ZREM', KEYS[1], id) == 1 then
      local okey = d[2]
      if not okey then okey = redis.call('HGET', key(base, 'msg', id), 'key') or '' end  -- a lease from an older build
      okeys[n] = okey
      gone[#gone + 1] = dkey
      done[id] = true
    end
  end
end
if u > 0 then
  call_chunked('ZREM', KEYS[1], unheld)
  call_chunked('HDEL', KEYS[5], unheld)
end
-- Second pass, in order: the next message of each ordering key, the bodies, the audit record.
for n, id in ipairs(ids) do
  local okey = okeys[n]
  if okey then
    if okey ~= '' then now = now or tonumber(ARGV[3]) end
    local next_live = okey ~= '' and key_done(q, okey, id, now)
    release_body(base, id, gone)
    if audit > 0 then redis.call('ZADD', KEYS[2], ARGV[3], id) end  -- ARGV[3]: now, a string (no printf)
    acked = acked + 1
    if next_live == 'delayed' then
      out[n] = 3
    elseif next_live then
      woke = true
      out[n] = 2
    else
      out[n] = 1
    end
  else
    out[n] = 0
  end
end
call_chunked('DEL', false, gone)
if woke then redis.call('PUBLISH', key(base, 'wake'), 'k') end
if audit > 0 and acked > 0 then
  local audit_ttl = tonumber(ARGV[5])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tonumber(ARGV[3]) - audit_ttl * 1000)
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -audit - 1)
  redis.call('EXPIRE', KEYS[2], audit_ttl)
end
return out
