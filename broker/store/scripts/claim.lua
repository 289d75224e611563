-- claim.lua: transition READY -> LEASED for up to N messages, oldest first.
-- A first delivery (no delivery hash) is leased with one field of <gb>held (_lib.lua, "First deliveries"); a later
-- one (its delivery hash exists: a retry, a released or reprocessed message) updates its delivery hash.
-- KEYS[1]  <gb>ready   LIST
-- KEYS[2]  <gb>leased  ZSET id -> lease deadline (ms)
-- KEYS[3]  <gb>held    HASH id -> first delivery's lease state
-- Built (_lib.lua key(), from ARGV[1]): each body <base>msg:<id> and delivery <gb>dlv:<id>
-- ARGV[1]  base, ARGV[2] group, ARGV[3] N, ARGV[4] now, ARGV[5] lease deadline (now + lease ms: the caller adds, so
--          the script parses and prints no number; epoch ms), ARGV[6] consumer, ARGV[7] node,
-- ARGV[8]  strict order (1|0): at most one lease in the whole group, and a head whose retry is not due yet
--          (delivery field not_before) holds the queue
-- ARGV[9]  claim tag "<now>.<n>", unique per claim call of a node: receipts are "<tag>-<claim seq>", so the
--          deliveries of one claim can be found again (unclaim.lua) and no two claims share a receipt prefix
-- Returns  flat array, 7 per message: id, payload|false, headers, published_at, key, attempt, receipt
--          (payload false: the queue held an id whose body is gone; it is dropped and reported by the caller)
-- Numbers stay the strings they came as, and nothing per message is a number made a string: Redis formats each
-- number argument of a redis.call with printf (%.17g) and Lua each concatenated one (%.14g), tonumber() is a strtod:
-- about a microsecond of Redis CPU apiece.
local base, group, n, deadline = ARGV[1], ARGV[2], ARGV[3], ARGV[5]
local gb = key(base, 'g', group, '')  -- the group's base (per-message keys): its other keys are in KEYS
if ARGV[8] == '1' then
  if redis.call('ZCARD', KEYS[2]) > 0 then return {} end
  local head = redis.call('LINDEX', KEYS[1], 0)
  if not head then return {} end
  local nb = redis.call('HGET', key(gb, 'dlv', head), 'not_before')
  if nb and tonumber(nb) > tonumber(ARGV[4]) then return {} end
  n = '1'
end
local ids = redis.call('LPOP', KEYS[1], n)
if not ids then return {} end
local first = ARGV[9] .. '-1'  -- a first delivery's receipt (claims 1): the same for every one of this call
-- The replies and batched arguments are filled with counters (#t is a search per append), and start sized for one
-- message (each entry is overwritten: a table grown from {} one entry at a time is rebuilt at 1, 2, 4 and 8 entries,
-- about 800 instructions apiece, which is what a one-message claim paid).
local out, o = {false, false, false, false, false, false, false}, 0
local lease_args, l = {false, false}, 0  -- ZADD pairs (deadline, id): one call for the whole claim (if l > 0)
local held, h = {false, false}, 0        -- HSET pairs (id, state) of the first deliveries: one call (if h > 0)
local first_held = first .. '|' .. ARGV[7] .. '|' .. ARGV[6] .. '|'  -- a held value up to its ordering key
-- One EXISTS over the batch's delivery hashes: none (the usual case, every id on its first delivery) saves a read
-- per message; otherwise each is read until as many were found as EXISTS counted (the rest are first deliveries).
-- A first retry is promoted to the head of the list, so under load (a retry in most claims) it is found first and
-- the batch's other messages are not read for nothing.
local dkeys = {false}
for i, id in ipairs(ids) do dkeys[i] = key(gb, 'dlv', id) end
local later = 0
for s = 1, #dkeys, 1000 do later = later + redis.call('EXISTS', unpack(dkeys, s, math.min(s + 999, #dkeys))) end
local NONE = {false, false, false}
local found = 0  -- delivery hashes read that exist (no more reads once it is `later`)
for i, id in ipairs(ids) do
  local b = redis.call('HMGET', key(base, 'msg', id), 'payload', 'headers', 'published_at', 'key')
  if b[1] then
    local dkey = dkeys[i]
    local d = found < later and redis.call('HMGET', dkey, 'attempts', 'claims', 'not_before') or NONE
    if d[1] or d[2] or d[3] then found = found + 1 end
    local attempt, receipt
    if not d[1] and not d[2] then
      attempt, receipt = 1, first
      held[h + 1] = id; held[h + 2] = first_held .. (b[4] or ''); h = h + 2
    else
      local claims = (tonumber(d[2]) or 0) + 1
      attempt, receipt = (tonumber(d[1]) or 0) + 1, ARGV[9] .. '-' .. claims
      -- 'key' ('' for none) saves ack.lua a read of the body; older leases lack it and ack reads the body then
      redis.call('HSET', dkey, 'attempts', attempt, 'claims', claims, 'receipt', receipt,
        'consumer', ARGV[6], 'node', ARGV[7], 'leased_until', deadline, 'key', b[4] or '')
      if d[3] then redis.call('HDEL', dkey, 'not_before') end
    end
    lease_args[l + 1] = deadline; lease_args[l + 2] = id; l = l + 2
    out[o + 1] = id; out[o + 2] = b[1]; out[o + 3] = b[2]; out[o + 4] = b[3]
    out[o + 5] = b[4] or ''; out[o + 6] = attempt; out[o + 7] = receipt
  else
    out[o + 1] = id; out[o + 2] = false; out[o + 3] = ''; out[o + 4] = 0
    out[o + 5] = ''; out[o + 6] = 0; out[o + 7] = ''
  end
  o = o + 7
end
if l > 0 then call_chunked('ZADD', KEYS[2], lease_args) end
if h > 0 then call_chunked('HSET', KEYS[3], held) end
return out
