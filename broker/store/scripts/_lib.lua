-- _lib.lua: helpers for the scripts (not a transition of its own). Each script is loaded with the top-level definitions
-- below that it uses, and the ones those use (broker/store/lua_lib.py): Redis runs a script's whole text on every call.
--
-- Key schema (docs/keys.md; broker/store/keys.py builds the same names in Python, tests/test_lua_schema.py holds the
-- two together). A script touches two kinds of keys:
--   declared  every key the caller can name ahead (a group's ready, leased, delayed, dead, acked; the topic's
--             groups and imported): passed in KEYS, as each script's header lists.
--   built     keys a script learns only at run time, built by key() and by nothing else: per message
--             (msg:<id>, idem:<key>, g:<group>:dlv:<id>, g:<group>:dead:<id>, g:<group>:key:<okey>) and, in
--             publish.lua and import.lua only, the group keys of groups read from the topic's group set or from
--             the import file. They are built from the call's base, ARGV[1] = "<prefix>:{<topic>}:" (TopicKeys.base),
--             which carries the topic's hash tag: a built key is always in the slot of the declared ones.
-- Names (base = "<prefix>:{<topic>}:", gb = group base = key(base, 'g', group, '') = base.."g:<group>:"):
--   key(base, 'groups') SET, key(base, 'msg', id) HASH body, key(base, 'idem', k) STRING, key(base, 'imported')
--   ZSET, key(base, 'wake') Pub/Sub channel; key(gb, 'ready') LIST, key(gb, 'leased') ZSET, key(gb, 'delayed') ZSET,
--   key(gb, 'dead') ZSET index, key(gb, 'acked') ZSET, key(gb, 'held') HASH first deliveries' leases (below),
--   key(gb, 'dlv', id) HASH delivery state, key(gb, 'dead', id) HASH dead letter (with TTL), key(gb, 'key', K) LIST
--   the group's unfinished ids of ordering key K, in publish order (only its head is live).
-- Records built here and nowhere else: error entries (error_entry) and dead letters (dead_letter, put_dead_letter).

-- The one key builder: base followed by the parts joined with ':' (base ends with ':'). Plain concatenation for up
-- to four parts (every key of the schema): no table per key, which a varargs table.concat would build (about half a
-- microsecond of Redis CPU a key, several keys a message).
local function key(base, a, b, c, d, ...)
  if b == nil then return base .. a end
  if c == nil then return base .. a .. ':' .. b end
  if d == nil then return base .. a .. ':' .. b .. ':' .. c end
  if select('#', ...) == 0 then return base .. a .. ':' .. b .. ':' .. c .. ':' .. d end
  return base .. table.concat({a, b, c, d, ...}, ':')
end

-- One group's keys: q.ready, q.leased, q.delayed, q.dead, q.held (pass the declared ones from KEYS; nil: built by
-- key(), for groups known only at run time) and q.gb, its base for per-message keys; q.base is the topic's base.
local function group_keys(base, group, ready, leased, delayed, dead, held)
  local gb = key(base, 'g', group, '')
  return {base = base, name = group, gb = gb,
    ready = ready or key(gb, 'ready'), leased = leased or key(gb, 'leased'),
    delayed = delayed or key(gb, 'delayed'), dead = dead or key(gb, 'dead'), held = held or key(gb, 'held')}
end

-- First deliveries. A message claimed for the first time in a group (no delivery hash: never claimed, nothing
-- failed) keeps its lease state in one field of the group's hash key(gb, 'held'): id -> "<receipt>|<node>|<consumer>|
-- <okey>" (okey '' for none; receipt, node and consumer ids never hold '|', the key may), its deadline being its
-- score in leased, its attempt 1. Nothing else is written for it, and an ack deletes that one field: no per-message
-- hash is created only to be deleted. Its delivery hash key(gb, 'dlv', id) is written only when the delivery fails
-- (nack, lease expiry: unhold() below), and from then on holds its state as for every later attempt.
-- The fields of a held value: receipt, node, consumer, okey.
local function held_fields(v)
  return string.match(v, '^([^|]*)|([^|]*)|([^|]*)|(.*)$')
end

-- A held first delivery's lease state moves to its own delivery hash (attempts 1, claims 1, receipt, consumer, node,
-- leased_until, key), the fields claim.lua writes for a later attempt: the transition that called this then works
-- on the delivery hash alone. Call it before the id leaves leased (its score is the deadline). No-op when not held.
local function unhold(q, id)
  local v = redis.call('HGET', q.held, id)
  if not v then return end
  local receipt, node, consumer, okey = held_fields(v)
  redis.call('HDEL', q.held, id)
  redis.call('HSET', key(q.gb, 'dlv', id), 'attempts', 1, 'claims', 1, 'receipt', receipt, 'consumer', consumer,
    'node', node, 'leased_until', redis.call('ZSCORE', q.leased, id) or 0, 'key', okey)
end

-- The receipt, node, consumer and ordering key ('' none, nil unknown) of a leased id, held or not.
local function lease_of(q, id)
  local v = redis.call('HGET', q.held, id)
  if v then return held_fields(v) end
  local d = redis.call('HMGET', key(q.gb, 'dlv', id), 'receipt', 'node', 'consumer', 'key')
  return d[1], d[2], d[3], d[4]
end

-- redis.call(cmd, key, ...list) in chunks (key false: redis.call(cmd, ...list), e.g. DEL of many keys): unpack() of
-- more than ~8000 values fails ("too many results to unpack").
local function call_chunked(cmd, k, list)
  for s = 1, #list, 1000 do
    local e = math.min(s + 999, #list)
    if k then redis.call(cmd, k, unpack(list, s, e)) else redis.call(cmd, unpack(list, s, e)) end
  end
end

-- A JSON string literal for s, byte for byte as orjson writes it (the Python side, _error_entry): '"', '\' and the
-- control characters below 0x20 escaped (\b \t \n \f \r, the others \u00xx), nothing else ('/', 0x7f and UTF-8
-- bytes as they are).
local JSON_ESCAPES = {['"'] = '\\"', ['\\'] = '\\\\', ['\b'] = '\\b', ['\f'] = '\\f', ['\n'] = '\\n',
  ['\r'] = '\\r', ['\t'] = '\\t', ['\127'] = '\127'}
local function json_string(s)
  return '"' .. string.gsub(s, '[%c"\\]', function(c)
    return JSON_ESCAPES[c] or string.format('\\u%04x', string.byte(c))
  end) .. '"'
end

-- One entry of a delivery's error history, as JSON object text:
-- {"attempt":<n>,"error":"<text>","at":<epoch ms>,"consumer":"<consumer id>"}. The Python side
-- (broker/store/redis_store.py _error_entry: nack.lua's entries, import notes) writes the same bytes.
local function error_entry(attempt, err, at, consumer)
  return '{"attempt":' .. attempt .. ',"error":' .. json_string(err) .. ',"at":' .. at .. ',"consumer":' ..
    json_string(consumer) .. '}'
end

-- Append one error entry (JSON object text) to a delivery's history (a JSON array body without brackets).
local function add_error(dkey, entry)
  local errs = redis.call('HGET', dkey, 'errors')
  if errs and errs ~= '' then errs = errs .. ',' .. entry else errs = entry end
  redis.call('HSET', dkey, 'errors', errs)
end

-- Drop one group's reference to a body; the body goes when the last group is done with it: at once, or, given a
-- list gone, by the caller's one DEL for a whole batch (the body's key is added to gone).
local function release_body(base, id, gone)
  local bkey = key(base, 'msg', id)
  if redis.call('HINCRBY', bkey, 'refs', '-1') <= 0 then  -- a string: Redis would printf a number argument
    if gone then gone[#gone + 1] = bkey else redis.call('DEL', bkey) end
  end
end

-- Retry delay (ms) before attempt+1: min(cap, base * mult^(attempt-1)) times a jitter factor u that the caller
-- drew from [1 - jitter, 1 + jitter]; at least 1 ms. The same formula as broker.resilience.backoff_delay.
local function backoff(attempt, base, mult, cap, u)
  local raw = math.min(cap, base * mult ^ math.max(0, attempt - 1))
  return math.max(1, math.min(cap, math.floor(raw * u + 0.5)))
end

-- A message's own retry policy (publish fields max_attempts / backoff_base_ms on its body), else the defaults.
local function policy(base, id, max_attempts, backoff_base)
  local p = redis.call('HMGET', key(base, 'msg', id), 'max_attempts', 'backoff_base_ms')
  return tonumber(p[1]) or max_attempts, tonumber(p[2]) or backoff_base
end

-- Per-key ordering. A message with ordering key K joins the end of K's line in the group (key(gb, 'key', K)); only
-- the head of the line is live (ready, leased or waiting for a retry), so one message per key is in flight and the
-- rest follow in publish order. Returns true when id is the head (the caller makes it live).
local function key_join(q, okey, id)
  return redis.call('RPUSH', key(q.gb, 'key', okey), id) == 1
end

-- Make a message live in a group: the ready tail, or the delayed set while its publish delay (body field
-- deliver_at) has not passed. Returns 'ready' or 'delayed' (where it went).
local function make_live(q, id, now)
  local due = tonumber(redis.call('HGET', key(q.base, 'msg', id), 'deliver_at') or '0')
  if due > now then
    redis.call('ZADD', q.delayed, due, id)
    return 'delayed'
  end
  redis.call('RPUSH', q.ready, id)
  return 'ready'
end

-- The head of key K's line is finished in this group (acked or dead): the next message of K goes live.
-- Returns false when none did, else where it went ('ready' or 'delayed', both true).
local function key_done(q, okey, id, now)
  local line = key(q.gb, 'key', okey)
  if redis.call('LINDEX', line, 0) ~= id then  -- not the head (should not happen): just leave the line
    redis.call('LREM', line, 1, id)
    return false
  end
  redis.call('LPOP', line)
  local nxt = redis.call('LINDEX', line, 0)
  if not nxt then return false end
  return make_live(q, nxt, now)
end

-- The body fields a dead letter carries under the body's own names (the ones after published_at only when the
-- body has them), so reprocess.lua can rebuild the body from it.
local BODY_FIELDS = {'payload', 'headers', 'published_at', 'key', 'max_attempts', 'backoff_base_ms'}

-- Write one dead letter: HASH key(gb, 'dead', id) of (field, value) pairs fields, expiring after ttl seconds (nil
-- or '': no TTL), indexed in q.dead by died_at. The only writer of the record (dead_letter, and import.lua for an
-- exported one).
local function put_dead_letter(q, id, fields, died_at, ttl)
  local xkey = key(q.gb, 'dead', id)
  call_chunked('HSET', xkey, fields)
  if ttl and ttl ~= '' then redis.call('EXPIRE', xkey, ttl) end
  redis.call('ZADD', q.dead, died_at, id)
end

-- LEASED/any -> DEAD: a self-contained dead letter (docs/keys.md): id, topic, group, payload, headers,
-- published_at, attempts, errors (JSON array), last_consumer, reason, died_at, then key, max_attempts,
-- backoff_base_ms when the body has them; the delivery hash goes, the body loses this group's reference.
-- Returns true when this let the next message of the same ordering key go live.
local function dead_letter(q, topic, id, reason, now, ttl)
  local dkey = key(q.gb, 'dlv', id)
  local b = redis.call('HMGET', key(q.base, 'msg', id), unpack(BODY_FIELDS))
  local d = redis.call('HMGET', dkey, 'attempts', 'errors', 'consumer')
  local fields = {'id', id, 'topic', topic, 'group', q.name,
    'payload', b[1] or 'null', 'headers', b[2] or '{}', 'published_at', b[3] or '0',
    'attempts', d[1] or '0', 'errors', '[' .. (d[2] or '') .. ']',
    'last_consumer', d[3] or '', 'reason', reason, 'died_at', now}
  for j = 4, #BODY_FIELDS do
    if b[j] then fields[#fields + 1] = BODY_FIELDS[j]; fields[#fields + 1] = b[j] end
  end
  put_dead_letter(q, id, fields, now, ttl)
  redis.call('DEL', dkey)
  local woke = b[4] and key_done(q, b[4], id, now)
  if b[1] then release_body(q.base, id) end
  return woke
end

-- LEASED -> RETRY_WAIT. Concurrent groups: the delayed set, promoted when due. Strict-order groups: back to the
-- head of the ready list with a not_before time, so nothing behind it is delivered first (FIFO across retries).
local function schedule_retry(q, id, due, strict)
  if strict == '1' then
    redis.call('HSET', key(q.gb, 'dlv', id), 'not_before', due)
    redis.call('LPUSH', q.ready, id)
  else
    redis.call('ZADD', q.delayed, due, id)
  end
end
