-- publish.lua: transition (none) -> READY, or (none) -> RETRY_WAIT when delay_ms > 0.
-- Stores N messages of one topic in every group's queue in one atomic step.
-- KEYS[1]  <base>groups            SET of the topic's groups
-- ARGV[1]  base "<prefix>:{<topic>}:"
-- ARGV[2]  now (epoch ms)
-- ARGV[3]  idempotency TTL (s)
-- ARGV[4]  policy when the topic has no group: "default" (create group default) | "reject"
-- ARGV[5]  N, then N x 6 args: id, payload, headers, idempotency_key|"", delay_ms, key|""
-- Returns  flat array, 3 per message: id, duplicate (0|1), groups stored in (-1: rejected, no group)
local base, now, ttl, policy, n = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], tonumber(ARGV[5])
local groups = redis.call('SMEMBERS', KEYS[1])
local out = {}
if #groups == 0 then
  if policy == 'default' then
    redis.call('SADD', KEYS[1], 'default')
    groups = {'default'}
  else
    for i = 0, n - 1 do
      out[#out + 1] = ARGV[6 + i * 6]; out[#out + 1] = 0; out[#out + 1] = -1
    end
    return out
  end
end
local ready = {}
for i = 0, n - 1 do
  local o = 6 + i * 6
  local id, payload, headers, idem, delay, key = ARGV[o], ARGV[o+1], ARGV[o+2], ARGV[o+3], tonumber(ARGV[o+4]), ARGV[o+5]
  local existing = false
  if idem ~= '' then
    local ikey = base .. 'idem:' .. idem
    existing = redis.call('GET', ikey)
    if not existing then redis.call('SET', ikey, id, 'EX', ttl) end
  end
  if existing then
    out[#out + 1] = existing; out[#out + 1] = 1; out[#out + 1] = 0
  else
    local bkey = base .. 'msg:' .. id
    redis.call('HSET', bkey, 'payload', payload, 'headers', headers, 'published_at', now, 'refs', #groups)
    if key ~= '' then redis.call('HSET', bkey, 'key', key) end
    if delay > 0 then
      for _, g in ipairs(groups) do redis.call('ZADD', base .. 'g:' .. g .. ':delayed', now + delay, id) end
    else
      ready[#ready + 1] = id
    end
    out[#out + 1] = id; out[#out + 1] = 0; out[#out + 1] = #groups
  end
end
if #ready > 0 then
  for _, g in ipairs(groups) do call_chunked('RPUSH', base .. 'g:' .. g .. ':ready', ready) end
  redis.call('PUBLISH', base .. 'wake', 'p')
end
return out
