-- claim.lua: transition READY -> LEASED for up to N messages, oldest first.
-- A first delivery (no delivery hash) is leased with one field of <gb>held (_lib.lua, "First deliveries"); a later
-- one (its delivery hash exists: a retry, a released or reprocessed message) updates its delivery hash.
-- KEYS[1]  <gb>ready   LIST
-- KEYS[2]  <gb>leased  ZSET id -> lease deadline (ms)
-- KEYS[3]  <gb>held    HASH id -> first delivery's lease state
-- Built (_lib.lua key(), from ARGV[1]): each body <base>msg:<id> and delivery <gb>dlv:<id>
-- ARGV[1]  base, ARGV[2] group, ARGV[3] N, ARGV[4] now, ARGV[5] lease_ms, ARGV[6] consumer, ARGV[7] node,
-- ARGV[8]  strict order (1|0): at most one lease in the whole group, and a head whose retry is not due yet
--          (delivery field not_before) holds the queue
-- ARGV[9]  claim tag "<now>.<n>", unique per claim call of a node: receipts are "<tag>-<claim seq>", so the
--          deliveries of one claim can be found again (unclaim.lua) and no two claims share a receipt prefix
-- Returns  flat array, 7 per message: id, payload|false, headers, published_at, key, attempt, receipt
--          (payload false: the queue held an id whose body is gone; it is dropped and reported by the caller)
local base, group, n, now, lease = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local q = group_keys(base, group, KEYS[1], KEYS[2], nil, nil, KEYS[3])
if ARGV[8] == '1' then
  if redis.call('ZCARD', KEYS[2]) > 0 then return {} end
  local head = redis.call('LINDEX', KEYS[1], 0)
  if not head then return {} end
  local nb = redis.call('HGET', key(q.gb, 'dlv', head), 'not_before')
  if nb and tonumber(nb) > now then return {} end
  n = 1
end
local ids = redis.call('LPOP', KEYS[1], n)
if not ids then return {} end
local deadline = now + lease
local out = {}
local lease_args = {}     -- ZADD pairs (deadline, id): one call for the whole claim
local held = {}           -- HSET pairs (id, state) of the first deliveries: one call for the whole claim
local holder = '|' .. ARGV[7] .. '|' .. ARGV[6] .. '|'
-- One EXISTS over the batch's delivery hashes: none (the usual case, every id on its first delivery) saves a read
-- per message; otherwise each is read.
local dkeys = {}
for i, id in ipairs(ids) do dkeys[i] = key(q.gb, 'dlv', id) end
local later = 0
for s = 1, #dkeys, 1000 do later = later + redis.call('EXISTS', unpack(dkeys, s, math.min(s + 999, #dkeys))) end
local NONE = {false, false, false}
for i, id in ipairs(ids) do
  local b = redis.call('HMGET', key(base, 'msg', id), 'payload', 'headers', 'published_at', 'key')
  if b[1] then
    local dkey = dkeys[i]
    local d = later > 0 and redis.call('HMGET', dkey, 'attempts', 'claims', 'not_before') or NONE
    local attempt, claims = (tonumber(d[1]) or 0) + 1, (tonumber(d[2]) or 0) + 1
    local receipt = ARGV[9] .. '-' .. claims
    if not d[1] and not d[2] then
      held[#held + 1] = id; held[#held + 1] = receipt .. holder .. (b[4] or '')
    else
      -- 'key' ('' for none) saves ack.lua a read of the body; older leases lack it and ack reads the body then
      redis.call('HSET', dkey, 'attempts', attempt, 'claims', claims, 'receipt', receipt,
        'consumer', ARGV[6], 'node', ARGV[7], 'leased_until', deadline, 'key', b[4] or '')
      if d[3] then redis.call('HDEL', dkey, 'not_before') end
    end
    lease_args[#lease_args + 1] = deadline; lease_args[#lease_args + 1] = id
    out[#out + 1] = id; out[#out + 1] = b[1]; out[#out + 1] = b[2]; out[#out + 1] = b[3]
    out[#out + 1] = b[4] or ''; out[#out + 1] = attempt; out[#out + 1] = receipt
  else
    out[#out + 1] = id; out[#out + 1] = false; out[#out + 1] = ''; out[#out + 1] = 0
    out[#out + 1] = ''; out[#out + 1] = 0; out[#out + 1] = ''
  end
end
if #lease_args > 0 then call_chunked('ZADD', KEYS[2], lease_args) end
if #held > 0 then call_chunked('HSET', KEYS[3], held) end
return out
