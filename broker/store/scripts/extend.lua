-- extend.lua: transition LEASED -> LEASED with a later deadline (lease extension).
-- KEYS[1] <gb>leased, KEYS[2] <gb>held (a first delivery's lease state: only its deadline, the score, changes)
-- Built (_lib.lua key(), from ARGV[1]): the delivery <gb>dlv:<id>
-- ARGV[1] base, ARGV[2] group, ARGV[3] id, ARGV[4] receipt, ARGV[5] new deadline (ms)
-- Returns 1 (extended) | 0 (stale)
local dkey = key(ARGV[1], 'g', ARGV[2], 'dlv', ARGV[3])
local v = redis.call('HGET', KEYS[2], ARGV[3])
if v then
  if held_fields(v) == ARGV[4] and redis.call('ZSCORE', KEYS[1], ARGV[3]) then
    redis.call('ZADD', KEYS[1], ARGV[5], ARGV[3])
    return 1
  end
  return 0
end
if redis.call('HGET', dkey, 'receipt') == ARGV[4] and redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[5], ARGV[3])
  redis.call('HSET', dkey, 'leased_until', ARGV[5])
  return 1
end
return 0
