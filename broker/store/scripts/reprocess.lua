-- reprocess.lua: transition DEAD -> READY. The dead letter becomes a live delivery again at the tail of its
-- group's queue: attempts reset to 0, error history kept (plus a "reprocessed" entry), body restored or re-referenced.
-- A message with an ordering key joins the end of its key's line: live at once only when the line was empty, else
-- DEAD -> KEY_WAIT.
-- Idempotent: a second run finds no dead letter and reports "missing"; nothing is ever queued twice.
-- KEYS[1] <gb>dead (index), KEYS[2] <gb>ready
-- Built (_lib.lua key(), from ARGV[1]): each dead letter <gb>dead:<id>, body <base>msg:<id>, delivery <gb>dlv:<id>,
--         ordering key line <gb>key:<okey>; channel <base>wake
-- ARGV[1] base, ARGV[2] group, ARGV[3] now, ARGV[4] who (operator label), ARGV[5..] ids
-- Returns array per id: "ok" | "missing"
local base, group, now = ARGV[1], ARGV[2], ARGV[3]
local q = group_keys(base, group, KEYS[2], nil, nil, KEYS[1])
local nb = #BODY_FIELDS
local out = {}
for i = 5, #ARGV do
  local id = ARGV[i]
  local xkey = key(q.gb, 'dead', id)
  -- the dead letter carries the body's fields under their own names (BODY_FIELDS, dead_letter in _lib.lua)
  local x = redis.call('HMGET', xkey, 'errors', 'reprocessed', unpack(BODY_FIELDS))
  local errs, reprocessed = x[1], x[2]
  if not x[3] then
    redis.call('ZREM', KEYS[1], id)
    out[#out + 1] = 'missing'
  else
    local bkey = key(base, 'msg', id)
    if redis.call('EXISTS', bkey) == 1 then
      redis.call('HINCRBY', bkey, 'refs', 1)
    else
      redis.call('HSET', bkey, 'payload', x[3], 'headers', x[4], 'published_at', x[5], 'refs', 1)
      for j = 4, nb do
        if x[2 + j] then redis.call('HSET', bkey, BODY_FIELDS[j], x[2 + j]) end
      end
    end
    errs = string.sub(errs or '[]', 2, -2)
    local entry = error_entry(0, 'reprocessed from the dead-letter queue', now, ARGV[4])
    if errs ~= '' then errs = errs .. ',' .. entry else errs = entry end
    redis.call('HSET', key(q.gb, 'dlv', id), 'attempts', 0, 'errors', errs,
      'reprocessed', (tonumber(reprocessed or '0') + 1))
    local okey = x[6]
    if not okey or key_join(q, okey, id) then redis.call('RPUSH', KEYS[2], id) end
    redis.call('DEL', xkey)
    redis.call('ZREM', KEYS[1], id)
    out[#out + 1] = 'ok'
  end
end
redis.call('PUBLISH', key(base, 'wake'), 'd')
return out
