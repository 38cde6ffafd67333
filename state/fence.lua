-- Fenced save of a batch of stream states (lstream, docs/state.md). Atomic per call: the
-- check and the write of every stream run in one script, so no reader ever sees a state
-- without the position it reflects.
-- KEYS[1..n]: the streams' hashes, lstream:state:{<stream_id>}
-- ARGV[1]: k, the number of state fields per stream; ARGV[2..k+1]: their hash field names
-- ARGV[k+2..k+7]: model, layers, hidden, layout, updated_at, TTL in ms (0 = keep forever)
-- then per stream, 5 + k values: partition, offset, index, ts, event_id ('' = none), the k fields
-- Returns one code per stream: 1 applied; 3 already stored (the stored position and event_id
-- are exactly this save's: our own earlier write, whose reply was lost); 0 refused (a newer
-- position is stored); 2 refused (event_id equal to the stored one: a duplicate).
local k = tonumber(ARGV[1])
local h = k + 1
local model, layers, hidden, layout, updated = ARGV[h + 1], ARGV[h + 2], ARGV[h + 3], ARGV[h + 4], ARGV[h + 5]
local ttl = tonumber(ARGV[h + 6])
local base, width = h + 6, 5 + k
if #ARGV ~= base + width * #KEYS then
  return redis.error_reply('ERR lstream fence: expected ' .. (base + width * #KEYS) .. ' arguments for ' ..
    #KEYS .. ' streams, got ' .. #ARGV)
end
-- One argument table for every HSET of the call: the names and the call's common values are
-- set once, a stream's own values overwrite their slots (no table built per stream).
local args = {'partition', '', 'offset', '', 'index', '', 'ts', '', 'model', model, 'layers', layers,
              'hidden', hidden, 'layout', layout, 'updated_at', updated}
for j = 1, k do
  args[17 + 2 * j] = ARGV[1 + j]
end
local last = 18 + 2 * k
args[last + 1] = 'event_id'
local out = {}
for i = 1, #KEYS do
  local key, a = KEYS[i], base + (i - 1) * width
  local ps, os, is, ts, eid = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  local cur = redis.call('HMGET', key, 'partition', 'offset', 'index', 'ts', 'event_id')
  local code = 1
  if cur[1] or cur[2] then
    local p, o, ix = tonumber(ps), tonumber(os), tonumber(is)
    local cp, co, ci = tonumber(cur[1]) or -1, tonumber(cur[2]) or -1, tonumber(cur[3]) or 0
    local newer
    if cp == p then
      newer = o > co or (o == co and ix > ci)
    else
      -- The stream moved to another partition (repartitioned topic, new gateway key): offsets
      -- of two partitions do not compare, so event time decides.
      newer = tonumber(ts) >= (tonumber(cur[4]) or 0)
    end
    if not newer then
      if cp == p and o == co and ix == ci and (cur[5] or '') == eid then code = 3 else code = 0 end
    elseif eid ~= '' and cur[5] == eid then
      code = 2
    end
  end
  if code == 1 then
    args[2], args[4], args[6], args[8] = ps, os, is, ts
    for j = 1, k do
      args[18 + 2 * j] = ARGV[a + 5 + j]
    end
    if eid ~= '' then
      args[last + 2] = eid
      redis.call('HSET', key, unpack(args, 1, last + 2))
    else
      if cur[5] then redis.call('HDEL', key, 'event_id') end
      redis.call('HSET', key, unpack(args, 1, last))
    end
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) elseif cur[1] or cur[2] then redis.call('PERSIST', key) end
  end
  out[i] = code
end
return out
