-- release.lua: transition LEASED -> READY without counting an attempt: deliveries claimed but never sent
-- (consumer gone before the send, graceful shutdown). They go back to the head of the queue in their order.
-- A held first delivery (_lib.lua, "First deliveries") gets its delivery hash first (unhold), so it comes back like
-- any other: attempts 0 with its claim count kept (its next receipt is new).
-- KEYS[1] <gb>ready, KEYS[2] <gb>leased, KEYS[3] <gb>held
-- Built (_lib.lua key(), from ARGV[1]): each delivery <gb>dlv:<id>
-- ARGV[1] base, ARGV[2] group, then pairs: id, receipt (in delivery order)
-- A note on the wake channel when any went back (other nodes' idle loops of the group claim them).
-- Returns number released
local q = group_keys(ARGV[1], ARGV[2], KEYS[1], KEYS[2], nil, nil, KEYS[3])
local n = 0
for i = #ARGV - 1, 3, -2 do
  local id, receipt = ARGV[i], ARGV[i + 1]
  local dkey = key(q.gb, 'dlv', id)
  unhold(q, id)
  if redis.call('HGET', dkey, 'receipt') == receipt and redis.call('ZREM', KEYS[2], id) == 1 then
    redis.call('HINCRBY', dkey, 'attempts', -1)
    redis.call('LPUSH', KEYS[1], id)
    n = n + 1
  end
end
if n > 0 then redis.call('PUBLISH', key(ARGV[1], 'wake'), 'l') end
return n
