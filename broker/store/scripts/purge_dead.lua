-- purge_dead.lua: transition DEAD -> (deleted by an operator). Removes dead letters and their index entries.
-- KEYS[1] <gb>dead (index)
-- ARGV[1] group base "<prefix>:{<topic>}:g:<group>:", ARGV[2..] ids
-- Returns array per id: 1 deleted | 0 was not there
local out = {}
for i = 2, #ARGV do
  out[#out + 1] = redis.call('DEL', ARGV[1] .. 'dead:' .. ARGV[i])
  redis.call('ZREM', KEYS[1], ARGV[i])
end
return out
