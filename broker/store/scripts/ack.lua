-- ack.lua: transition LEASED -> ACKED for N deliveries of one group.
-- KEYS[1]  <gb>leased ZSET
-- ARGV[1]  base, ARGV[2] group, then pairs: id, receipt
-- Returns  array of 1 (acked) | 0 (stale: not leased, or leased under another receipt)
local base, group = ARGV[1], ARGV[2]
local gb = base .. 'g:' .. group .. ':'
local out = {}
for i = 3, #ARGV, 2 do
  local id, receipt = ARGV[i], ARGV[i + 1]
  local dkey = gb .. 'dlv:' .. id
  if redis.call('HGET', dkey, 'receipt') == receipt and redis.call('ZREM', KEYS[1], id) == 1 then
    redis.call('DEL', dkey)
    release_body(base, id)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
