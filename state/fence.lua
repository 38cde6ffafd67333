-- Fenced save of a batch of stream states (lstream, docs/state.md). Atomic per call: the
-- check and the write of every stream run in one script, so no reader ever sees a state
-- without the position it reflects.
-- The store fills in FIELDS (the hash field names of the StreamStates fields, the "stable" ones
-- first: written only when the stored value differs) and STABLE (how many are stable) from the
-- layout table (kernels/states.py) before loading this script.
-- It also fills in the store's constants: MODEL (model version), LAYERS, HIDDEN (the shape of h
-- and c), LAYOUT (the layout field) and TTL (ms, 0 = keep forever): one script per store.
-- KEYS[1..n]: the streams' hashes, lstream:state:{<stream_id>}
-- ARGV[1]: updated_at
-- then per stream, 5 + k values: partition, offset, index, ts, event_id ('' = none), the k fields
-- Returns one code per stream: 1 applied; 3 already stored (the stored position and event_id
-- are exactly this save's: our own earlier write, whose reply was lost); 0 refused (a newer
-- position is stored); 2 refused (event_id equal to the stored one: a duplicate).
local names = {--[[FIELDS]]}
local k, s = #names, --[[STABLE]]0
local model, layers, hidden, layout = --[[MODEL]]'', --[[LAYERS]]'', --[[HIDDEN]]'', --[[LAYOUT]]''
local ttl = --[[TTL]]0
local updated = ARGV[1]
local base, width = 1, 5 + k
if #ARGV ~= base + width * #KEYS then
  return redis.error_reply('ERR lstream fence: expected ' .. (base + width * #KEYS) .. ' arguments for ' ..
    #KEYS .. ' streams, got ' .. #ARGV)
end
-- What the fence reads: the position, then the fields written only when they changed.
-- (A literal, filled in with the stable field names: in a cluster the script runs once per stream.)
local read = {'partition', 'offset', 'index', 'ts', 'event_id', 'model', 'layers', 'hidden', 'layout'--[[READ]]}
local args = {}
local out = {}
for i = 1, #KEYS do
  local key, a = KEYS[i], base + (i - 1) * width
  local ps, os, is, ts, eid = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  local cur = redis.call('HMGET', key, unpack(read))
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
    -- Only what changed (Lua strings are interned: ~= compares pointers).
    args[1], args[2], args[3], args[4], args[5], args[6] = 'offset', os, 'ts', ts, 'updated_at', updated
    local m = 6
    if cur[1] ~= ps then m = m + 2; args[m - 1] = 'partition'; args[m] = ps end
    if cur[3] ~= is then m = m + 2; args[m - 1] = 'index'; args[m] = is end
    if cur[6] ~= model then m = m + 2; args[m - 1] = 'model'; args[m] = model end
    if cur[7] ~= layers then m = m + 2; args[m - 1] = 'layers'; args[m] = layers end
    if cur[8] ~= hidden then m = m + 2; args[m - 1] = 'hidden'; args[m] = hidden end
    if cur[9] ~= layout then m = m + 2; args[m - 1] = 'layout'; args[m] = layout end
    for j = 1, k do
      local v = ARGV[a + 5 + j]
      if j > s or cur[9 + j] ~= v then m = m + 2; args[m - 1] = names[j]; args[m] = v end
    end
    if eid ~= '' then
      if cur[5] ~= eid then m = m + 2; args[m - 1] = 'event_id'; args[m] = eid end
    elseif cur[5] then
      redis.call('HDEL', key, 'event_id')
    end
    redis.call('HSET', key, unpack(args, 1, m))
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) elseif cur[1] or cur[2] then redis.call('PERSIST', key) end
  end
  out[i] = code
end
return out
