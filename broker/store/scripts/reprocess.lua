-- reprocess.lua: transition DEAD -> READY. The dead letter becomes a live delivery again at the tail of its
-- group's queue: attempts reset to 0, error history kept (plus a "reprocessed" entry), body restored or re-referenced.
-- A message with an ordering key joins the end of its key's line: live at once only when the line was empty, else
-- DEAD -> KEY_WAIT.
-- Idempotent: a second run finds no dead letter and reports "missing"; nothing is ever queued twice.
-- KEYS[1] <gb>dead (index), KEYS[2] <gb>ready
-- ARGV[1] base, ARGV[2] group, ARGV[3] now, ARGV[4] who (operator label), ARGV[5..] ids
-- Returns array per id: "ok" | "missing"
local base, group, now = ARGV[1], ARGV[2], ARGV[3]
local gb = base .. 'g:' .. group .. ':'
local out = {}
for i = 5, #ARGV do
  local id = ARGV[i]
  local xkey = gb .. 'dead:' .. id
  local x = redis.call('HMGET', xkey, 'payload', 'headers', 'published_at', 'key', 'errors', 'reprocessed',
    'max_attempts', 'backoff_base_ms')
  if not x[1] then
    redis.call('ZREM', KEYS[1], id)
    out[#out + 1] = 'missing'
  else
    local bkey = base .. 'msg:' .. id
    if redis.call('EXISTS', bkey) == 1 then
      redis.call('HINCRBY', bkey, 'refs', 1)
    else
      redis.call('HSET', bkey, 'payload', x[1], 'headers', x[2], 'published_at', x[3], 'refs', 1)
      if x[4] then redis.call('HSET', bkey, 'key', x[4]) end
      if x[7] then redis.call('HSET', bkey, 'max_attempts', x[7]) end
      if x[8] then redis.call('HSET', bkey, 'backoff_base_ms', x[8]) end
    end
    local errs = string.sub(x[5] or '[]', 2, -2)
    local entry = '{"attempt":0,"error":"reprocessed from the dead-letter queue","at":' .. now ..
      ',"consumer":' .. cjson.encode(ARGV[4]) .. '}'
    if errs ~= '' then errs = errs .. ',' .. entry else errs = entry end
    local dkey = gb .. 'dlv:' .. id
    redis.call('HSET', dkey, 'attempts', 0, 'errors', errs, 'reprocessed', (tonumber(x[6] or '0') + 1))
    if not x[4] or key_join(gb, x[4], id) then redis.call('RPUSH', KEYS[2], id) end
    redis.call('DEL', xkey)
    redis.call('ZREM', KEYS[1], id)
    out[#out + 1] = 'ok'
  end
end
redis.call('PUBLISH', base .. 'wake', 'd')
return out
