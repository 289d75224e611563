-- publish.lua: transition (none) -> READY, or (none) -> RETRY_WAIT when delay_ms > 0, or (none) -> KEY_WAIT when
-- the message has an ordering key whose line in a group is not empty (it goes live when the line reaches it).
-- Stores N messages of one topic in every group's queue in one atomic step.
-- KEYS[1]  <base>groups            SET of the topic's groups
-- Built (_lib.lua key(), from ARGV[1]): each body <base>msg:<id>, idempotency key <base>idem:<key>, and, per group
--          read from KEYS[1] (known only at run time), its ready, delayed and key:<okey> lines; channel <base>wake
-- ARGV[1]  base "<prefix>:{<topic>}:"
-- ARGV[2]  now (epoch ms)
-- ARGV[3]  idempotency TTL (s)
-- ARGV[4]  policy when the topic has no group: "default" (create group default) | "reject"
-- ARGV[5]  N, then N x 8 args: id, payload, headers, idempotency_key|"", delay_ms, key|"", max_attempts|"",
--          backoff_base_ms|""   (the last two: the message's own retry policy, validated by the caller)
-- then     S, then S names: the topic's strict-order groups. There a key adds nothing (one message of the whole
--          group is in flight, in publish order) and a key line would reorder: keyed messages queue like others.
-- then     the publishing node's id: the payload of the wake-up note, so that node can skip its own notes; when
--          a message went to a delayed set, a second note "due:<node id>" (the other nodes' timers read the heads)
-- then     optional (one Redis, not a cluster): the channel every node's wake-up listener subscribes to and the one
--          the publishing node's listener alone subscribes to (keys.py listeners_channel, listener_channel). Given,
--          the wake-up note goes out only when a listener other than the publishing node's is subscribed: the
--          difference of their PUBSUB NUMSUB counts (a listener subscribes to both before its wake pattern, so it is
--          counted whenever a note could reach it). At a low rate every message travels alone, and a single node
--          paid a note per message that Redis wrote to its own listener only for it to be dropped (its own
--          consumers claim after its publishes: claims ride on them). The "due:" note always goes out.
-- Returns  flat array, 3 per message: id, duplicate (0|1), groups stored in (-1: rejected, no group)
local base, ttl, policy_, n = ARGV[1], ARGV[3], ARGV[4], tonumber(ARGV[5])
local now  -- ARGV[2] as a number, parsed only for a delay (tonumber() is a strtod, ~0.3 us of Redis CPU)
local W = 8
local groups = redis.call('SMEMBERS', KEYS[1])
-- The reply: 3 fields per message, filled by index; sized for one message (a table grown from {} one entry at a
-- time is rebuilt at 1, 2 and 4 entries, ~800 instructions apiece); n is at least 1.
local out = {false, false, false}
if #groups == 0 then
  if policy_ == 'default' then
    redis.call('SADD', KEYS[1], 'default')
    groups = {'default'}
  else
    for i = 0, n - 1 do
      out[3 * i + 1] = ARGV[6 + i * W]; out[3 * i + 2] = 0; out[3 * i + 3] = -1
    end
    return out
  end
end
local strict = {}
local s0 = 6 + n * W
local ns = tonumber(ARGV[s0] or '0')
for j = 1, ns do strict[ARGV[s0 + j]] = true end
local origin = ARGV[s0 + ns + 1] or 'p'
local all_listeners, own_listener = ARGV[s0 + ns + 2], ARGV[s0 + ns + 3]
-- Numbers written per message are strings made once (Redis formats each number argument with printf, ~0.6 us of
-- Redis CPU apiece): published_at is ARGV[2] as the caller wrote it (epoch ms, an integer), refs the group count.
local refs = tostring(#groups)
local ready = {}          -- group -> ids that go live now, in publish order
local q = {}              -- group -> its keys (group_keys)
for _, g in ipairs(groups) do ready[g] = {}; q[g] = group_keys(base, g) end
local live = false
local delayed = false
for i = 0, n - 1 do
  local o = 6 + i * W
  local id, payload, headers, idem = ARGV[o], ARGV[o+1], ARGV[o+2], ARGV[o+3]
  local delay, okey = ARGV[o+4] == '0' and 0 or tonumber(ARGV[o+4]), ARGV[o+5]
  if delay > 0 then now = now or tonumber(ARGV[2]) end
  local existing = false
  if idem ~= '' then  -- one call: set when absent, and answer what was there (Redis >= 7.0: NX with GET)
    existing = redis.call('SET', key(base, 'idem', idem), id, 'NX', 'GET', 'EX', ttl)
  end
  if existing then
    out[3 * i + 1] = existing; out[3 * i + 2] = 1; out[3 * i + 3] = 0
  else
    local bkey = key(base, 'msg', id)
    -- One HSET per body, its retry policy included (a message that carries one: one call, not one per field; the
    -- usual message, without one, builds no table for it)
    local maxa, bbase = ARGV[o+6], ARGV[o+7]
    if maxa == '' and bbase == '' then
      redis.call('HSET', bkey, 'payload', payload, 'headers', headers, 'published_at', ARGV[2], 'refs', refs)
    else
      local f = {'payload', payload, 'headers', headers, 'published_at', ARGV[2], 'refs', refs}
      if maxa ~= '' then f[#f + 1], f[#f + 2] = 'max_attempts', maxa end
      if bbase ~= '' then f[#f + 1], f[#f + 2] = 'backoff_base_ms', bbase end
      redis.call('HSET', bkey, unpack(f))
    end
    if okey ~= '' then
      redis.call('HSET', bkey, 'key', okey)
      if delay > 0 then redis.call('HSET', bkey, 'deliver_at', now + delay) end
      for _, g in ipairs(groups) do
        if strict[g] or key_join(q[g], okey, id) then
          if delay > 0 then
            redis.call('ZADD', q[g].delayed, now + delay, id)
            delayed = true
          else
            local l = ready[g]; l[#l + 1] = id; live = true
          end
        end
      end
    elseif delay > 0 then
      for _, g in ipairs(groups) do redis.call('ZADD', q[g].delayed, now + delay, id) end
      delayed = true
    else
      for _, g in ipairs(groups) do local l = ready[g]; l[#l + 1] = id end
      live = true
    end
    out[3 * i + 1] = id; out[3 * i + 2] = 0; out[3 * i + 3] = #groups
  end
end
for _, g in ipairs(groups) do
  if #ready[g] > 0 then call_chunked('RPUSH', q[g].ready, ready[g]) end
end
if live and own_listener then
  local c = redis.call('PUBSUB', 'NUMSUB', all_listeners, own_listener)
  live = c[2] - c[4] > 0
end
if live then redis.call('PUBLISH', key(base, 'wake'), origin) end
if delayed then redis.call('PUBLISH', key(base, 'wake'), 'due:' .. origin) end
return out
