-- _lib.lua: helpers prepended to every script at load time (not a transition of its own).
-- Key schema (docs/keys.md): base = "<prefix>:{<topic>}:"; group base gb = base .. "g:<group>:"
--   base.."groups" SET, base.."msg:"..id HASH body, gb.."ready" LIST, gb.."leased" ZSET, gb.."delayed" ZSET,
--   gb.."dlv:"..id HASH delivery state, gb.."dead" ZSET index, gb.."dead:"..id HASH dead letter (with TTL),
--   gb.."key:"..K LIST the group's unfinished ids of ordering key K, in publish order (only its head is live).

-- redis.call(cmd, key, ...list) in chunks (key false: redis.call(cmd, ...list), e.g. DEL of many keys): unpack() of
-- more than ~8000 values fails ("too many results to unpack").
local function call_chunked(cmd, key, list)
  for s = 1, #list, 1000 do
    local e = math.min(s + 999, #list)
    if key then redis.call(cmd, key, unpack(list, s, e)) else redis.call(cmd, unpack(list, s, e)) end
  end
end

-- Drop one group's reference to a body; the body goes when the last group is done with it: at once, or, given a
-- list gone, by the caller's one DEL for a whole batch (the body's key is added to gone).
local function release_body(base, id, gone)
  local bkey = base .. 'msg:' .. id
  if redis.call('HINCRBY', bkey, 'refs', -1) <= 0 then
    if gone then gone[#gone + 1] = bkey else redis.call('DEL', bkey) end
  end
end

-- Append one error entry (JSON object text) to a delivery's history (a JSON array body without brackets).
local function add_error(dkey, entry)
  local errs = redis.call('HGET', dkey, 'errors')
  if errs and errs ~= '' then errs = errs .. ',' .. entry else errs = entry end
  redis.call('HSET', dkey, 'errors', errs)
end

-- Retry delay (ms) before attempt+1: min(cap, base * mult^(attempt-1)) times a jitter factor u that the caller
-- drew from [1 - jitter, 1 + jitter]; at least 1 ms. The same formula as broker.resilience.backoff_delay.
local function backoff(attempt, base, mult, cap, u)
  local raw = math.min(cap, base * mult ^ math.max(0, attempt - 1))
  return math.max(1, math.floor(raw * u + 0.5))
end

-- A message's own retry policy (publish fields max_attempts / backoff_base_ms on its body), else the defaults.
local function policy(base, id, max_attempts, backoff_base)
  local p = redis.call('HMGET', base .. 'msg:' .. id, 'max_attempts', 'backoff_base_ms')
  return tonumber(p[1]) or max_attempts, tonumber(p[2]) or backoff_base
end

-- Per-key ordering. A message with ordering key K joins the end of K's line in the group (gb.."key:"..K); only the
-- head of the line is live (ready, leased or waiting for a retry), so one message per key is in flight and the
-- rest follow in publish order. Returns true when id is the head (the caller makes it live).
local function key_join(gb, key, id)
  return redis.call('RPUSH', gb .. 'key:' .. key, id) == 1
end

-- Make a message live in a group: the ready tail, or the delayed set while its publish delay (body field
-- deliver_at) has not passed.
local function make_live(base, gb, id, now)
  local due = tonumber(redis.call('HGET', base .. 'msg:' .. id, 'deliver_at') or '0')
  if due > now then
    redis.call('ZADD', gb .. 'delayed', due, id)
  else
    redis.call('RPUSH', gb .. 'ready', id)
  end
end

-- The head of key K's line is finished in this group (acked or dead): the next message of K goes live.
-- Returns true when one did.
local function key_done(base, gb, key, id, now)
  local line = gb .. 'key:' .. key
  if redis.call('LINDEX', line, 0) ~= id then  -- not the head (should not happen): just leave the line
    redis.call('LREM', line, 1, id)
    return false
  end
  redis.call('LPOP', line)
  local nxt = redis.call('LINDEX', line, 0)
  if not nxt then return false end
  make_live(base, gb, nxt, now)
  return true
end

-- LEASED/any -> DEAD: build a self-contained dead letter hash with a TTL, index it, free the body.
-- Returns true when this let the next message of the same ordering key go live.
local function dead_letter(base, gb, deadidx, topic, group, id, reason, now, ttl)
  local dkey = gb .. 'dlv:' .. id
  local b = redis.call('HMGET', base .. 'msg:' .. id, 'payload', 'headers', 'published_at', 'key', 'max_attempts',
    'backoff_base_ms')
  local d = redis.call('HMGET', dkey, 'attempts', 'errors', 'consumer')
  local xkey = gb .. 'dead:' .. id
  redis.call('HSET', xkey,
    'id', id, 'topic', topic, 'group', group,
    'payload', b[1] or 'null', 'headers', b[2] or '{}', 'published_at', b[3] or '0',
    'attempts', d[1] or '0', 'errors', '[' .. (d[2] or '') .. ']',
    'last_consumer', d[3] or '', 'reason', reason, 'died_at', now)
  if b[4] then redis.call('HSET', xkey, 'key', b[4]) end
  if b[5] then redis.call('HSET', xkey, 'max_attempts', b[5]) end
  if b[6] then redis.call('HSET', xkey, 'backoff_base_ms', b[6]) end
  redis.call('EXPIRE', xkey, ttl)
  redis.call('ZADD', deadidx, now, id)
  redis.call('DEL', dkey)
  local woke = b[4] and key_done(base, gb, b[4], id, now)
  if b[1] then release_body(base, id) end
  return woke
end

-- LEASED -> RETRY_WAIT. Concurrent groups: the delayed set, promoted when due. Strict-order groups: back to the
-- head of the ready list with a not_before time, so nothing behind it is delivered first (FIFO across retries).
local function schedule_retry(ready, delayed, dkey, id, due, strict)
  if strict == '1' then
    redis.call('HSET', dkey, 'not_before', due)
    redis.call('LPUSH', ready, id)
  else
    redis.call('ZADD', delayed, due, id)
  end
end
