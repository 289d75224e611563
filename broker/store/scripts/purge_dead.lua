-- purge_dead.lua: transition DEAD -> (deleted by an operator). Removes dead letters and their index entries.
-- KEYS[1] <gb>dead (index)
-- Built (_lib.lua key(), from ARGV[1]): each dead letter <gb>dead:<id>
-- ARGV[1] group base "<prefix>:{<topic>}:g:<group>:" (GroupKeys.base), ARGV[2..] ids
-- Returns array per id: 1 deleted | 0 was not there
local out = {}
for i = 2, #ARGV do
  out[#out + 1] = redis.call('DEL', key(ARGV[1], 'dead', ARGV[i]))
  redis.call('ZREM', KEYS[1], ARGV[i])
end
return out
