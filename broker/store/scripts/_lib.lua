-- _lib.lua: helpers prepended to every script at load time (not a transition of its own).
-- Key schema (docs/keys.md): base = "<prefix>:{<topic>}:"; group base gb = base .. "g:<group>:"
--   base.."groups" SET, base.."msg:"..id HASH body, gb.."ready" LIST, gb.."leased" ZSET, gb.."delayed" ZSET,
--   gb.."dlv:"..id HASH delivery state, gb.."dead" ZSET index, gb.."dead:"..id HASH dead letter (with TTL).

-- redis.call(cmd, key, ...list) in chunks: unpack() of more than ~8000 values fails ("too many results to unpack").
local function call_chunked(cmd, key, list)
  for s = 1, #list, 1000 do
    redis.call(cmd, key, unpack(list, s, math.min(s + 999, #list)))
  end
end

-- Drop one group's reference to a body; the body goes when the last group is done with it.
local function release_body(base, id)
  local bkey = base .. 'msg:' .. id
  local refs = redis.call('HINCRBY', bkey, 'refs', -1)
  if refs <= 0 then redis.call('DEL', bkey) end
end

-- Append one error entry (JSON object text) to a delivery's history (a JSON array body without brackets).
local function add_error(dkey, entry)
  local errs = redis.call('HGET', dkey, 'errors')
  if errs and errs ~= '' then errs = errs .. ',' .. entry else errs = entry end
  redis.call('HSET', dkey, 'errors', errs)
end

-- LEASED/any -> DEAD: build a self-contained dead letter hash with a TTL, index it, free the body.
local function dead_letter(base, gb, deadidx, topic, group, id, reason, now, ttl)
  local dkey = gb .. 'dlv:' .. id
  local b = redis.call('HMGET', base .. 'msg:' .. id, 'payload', 'headers', 'published_at', 'key')
  local d = redis.call('HMGET', dkey, 'attempts', 'errors', 'consumer')
  local xkey = gb .. 'dead:' .. id
  redis.call('HSET', xkey,
    'id', id, 'topic', topic, 'group', group,
    'payload', b[1] or 'null', 'headers', b[2] or '{}', 'published_at', b[3] or '0',
    'attempts', d[1] or '0', 'errors', '[' .. (d[2] or '') .. ']',
    'last_consumer', d[3] or '', 'reason', reason, 'died_at', now)
  if b[4] then redis.call('HSET', xkey, 'key', b[4]) end
  redis.call('EXPIRE', xkey, ttl)
  redis.call('ZADD', deadidx, now, id)
  redis.call('DEL', dkey)
  if b[1] then release_body(base, id) end
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
