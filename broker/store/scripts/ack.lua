-- ack.lua: transition LEASED -> ACKED for N deliveries of one group. An acked message with an ordering key lets
-- the next message of its key go live (KEY_WAIT -> READY).
-- KEYS[1]  <gb>leased ZSET
-- ARGV[1]  base, ARGV[2] group, ARGV[3] now (epoch ms), then pairs: id, receipt
-- Returns  array of 1 (acked) | 0 (stale: not leased, or leased under another receipt)
local base, group, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local gb = base .. 'g:' .. group .. ':'
local out = {}
local woke = false
for i = 4, #ARGV, 2 do
  local id, receipt = ARGV[i], ARGV[i + 1]
  local dkey = gb .. 'dlv:' .. id
  if redis.call('HGET', dkey, 'receipt') == receipt and redis.call('ZREM', KEYS[1], id) == 1 then
    redis.call('DEL', dkey)
    local key = redis.call('HGET', base .. 'msg:' .. id, 'key')
    if key and key_done(base, gb, key, id, now) then woke = true end
    release_body(base, id)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
if woke then redis.call('PUBLISH', base .. 'wake', 'k') end
return out
