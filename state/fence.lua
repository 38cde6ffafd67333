-- Fenced save of one stream's state (lstream). Atomic: the check and the write run as one
-- script, so no reader ever sees a state without the position it reflects.
-- KEYS[1]: the stream's hash, lstream:state:{<stream_id>}
-- ARGV[1]: event_id ('' = none)
-- ARGV[2]: the numbers, 56 bytes little-endian: int64 partition, offset, index, steps,
--          episode; float64 ts, updated_at. They are stored as decimal strings (binary on
--          the wire saves the client from formatting them; integers must stay below 2^53).
-- ARGV[3]: model version; ARGV[4]: TTL in ms (0 = keep forever)
-- ARGV[5..9]: h, c, pred, norm, anomaly (raw little-endian bytes, stored as they come)
-- Returns 1 applied, 0 refused (position not newer than the stored one),
--         2 refused (event_id equal to the stored one: a duplicate).
local key = KEYS[1]
local eid = ARGV[1]
if #ARGV[2] ~= 56 then
  return redis.error_reply('ERR lstream fence: expected 56 bytes of numbers, got ' .. #ARGV[2])
end
local p, o, i, nsteps, nepisode, nts, nupdated = struct.unpack('<i8<i8<i8<i8<i8<d<d', ARGV[2])
-- Shortest of %.15g/%.16g/%.17g that reads back as the same double (like Python's repr).
local function dec(x)
  for _, f in ipairs({'%.15g', '%.16g', '%.17g'}) do
    local s = string.format(f, x)
    if tonumber(s) == x then return s end
  end
  return string.format('%.17g', x)
end
local ps, ofs, is = string.format('%d', p), string.format('%d', o), string.format('%d', i)
local ts, updated = dec(nts), dec(nupdated)
local cur = redis.call('HMGET', key, 'partition', 'offset', 'index', 'ts', 'event_id', 'updated_at')
if cur[1] or cur[2] then
  local cp, co, ci = tonumber(cur[1]) or -1, tonumber(cur[2]) or -1, tonumber(cur[3]) or 0
  local newer
  if cp == p then
    newer = o > co or (o == co and i > ci)
  else
    -- The stream moved to another partition (repartitioned topic, new gateway key): offsets
    -- of two partitions do not compare, so event time decides.
    newer = nts >= (tonumber(cur[4]) or 0)
  end
  if not newer then
    -- Our own write sent again after a lost reply: report it as applied.
    if cp == p and o == co and i == ci and cur[6] == updated then return 1 end
    return 0
  end
  if eid ~= '' and cur[5] == eid then return 2 end
end
redis.call('HSET', key, 'h', ARGV[5], 'c', ARGV[6], 'pred', ARGV[7], 'model', ARGV[3],
  'steps', string.format('%d', nsteps), 'partition', ps, 'offset', ofs, 'index', is, 'ts', ts, 'norm', ARGV[8],
  'anomaly', ARGV[9], 'episode', string.format('%d', nepisode), 'updated_at', updated)
if eid == '' then
  redis.call('HDEL', key, 'event_id')
else
  redis.call('HSET', key, 'event_id', eid)
end
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  redis.call('PEXPIRE', key, ttl)
else
  redis.call('PERSIST', key)
end
return 1
