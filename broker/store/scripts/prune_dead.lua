-- prune_dead.lua: transition DEAD -> EXPIRED for the index. Redis expires the dead-letter hash itself (TTL);
-- this drops index entries whose hash is gone, so no listing ever shows an expired dead letter.
-- KEYS[1] <gb>dead (index)
-- Built (_lib.lua key(), from ARGV[1]): each dead letter <gb>dead:<id>
-- ARGV[1] group base "<prefix>:{<topic>}:g:<group>:" (GroupKeys.base), ARGV[2] died_at cutoff (now - ttl, ms),
-- ARGV[3] how many of the oldest entries to verify
-- Returns number of index entries removed
local n = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local oldest = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[3]) - 1)
for _, id in ipairs(oldest) do
  if redis.call('EXISTS', key(ARGV[1], 'dead', id)) == 0 then
    redis.call('ZREM', KEYS[1], id)
    n = n + 1
  end
end
return n
