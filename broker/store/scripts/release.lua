-- release.lua: transition LEASED -> READY without counting an attempt: deliveries claimed but never sent
-- (consumer gone before the send, graceful shutdown). They go back to the head of the queue in their order.
-- KEYS[1] <gb>ready, KEYS[2] <gb>leased
-- ARGV[1] base, ARGV[2] group, then pairs: id, receipt (in delivery order)
-- Returns number released
local gb = ARGV[1] .. 'g:' .. ARGV[2] .. ':'
local n = 0
for i = #ARGV - 1, 3, -2 do
  local id, receipt = ARGV[i], ARGV[i + 1]
  local dkey = gb .. 'dlv:' .. id
  if redis.call('HGET', dkey, 'receipt') == receipt and redis.call('ZREM', KEYS[2], id) == 1 then
    redis.call('HINCRBY', dkey, 'attempts', -1)
    redis.call('LPUSH', KEYS[1], id)
    n = n + 1
  end
end
return n
