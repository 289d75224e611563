-- unclaim.lua: transition LEASED -> READY for the deliveries of one claim whose reply was lost (the connection
-- to Redis broke after the script ran). They were never handed to a consumer: back to the head of the queue with
-- the attempt not counted, so a Redis outage burns no attempts. Idempotent: a second run finds nothing.
-- A held first delivery (_lib.lua, "First deliveries") gets its delivery hash first (unhold), so it comes back like
-- any other: attempts 0 with its claim count kept.
-- KEYS[1] <gb>ready, KEYS[2] <gb>leased, KEYS[3] <gb>held
-- Built (_lib.lua key(), from ARGV[1]): each delivery <gb>dlv:<id>
-- ARGV[1] base, ARGV[2] group, ARGV[3] consumer, ARGV[4] receipt prefix ("<claim tag>-"), ARGV[5] lease deadline
-- A note on the wake channel when any went back (other nodes' idle loops of the group claim them).
-- Returns number of deliveries given back
local q = group_keys(ARGV[1], ARGV[2], KEYS[1], KEYS[2], nil, nil, KEYS[3])
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[5], ARGV[5])
local back = {}
for _, id in ipairs(ids) do
  local dkey = key(q.gb, 'dlv', id)
  local receipt, _, consumer = lease_of(q, id)
  if consumer == ARGV[3] and receipt and string.sub(receipt, 1, #ARGV[4]) == ARGV[4] then
    unhold(q, id)
    redis.call('ZREM', KEYS[2], id)
    redis.call('HINCRBY', dkey, 'attempts', -1)
    back[#back + 1] = id
  end
end
for i = #back, 1, -1 do redis.call('LPUSH', KEYS[1], back[i]) end
if #back > 0 then redis.call('PUBLISH', key(ARGV[1], 'wake'), 'l') end
return #back
