-- Batched read of stream states (lstream): the fields ARGV of every hash KEYS, in order, as
-- HMGET gives them. One call instead of one HMGET per stream: one reply for the client to parse.
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('HMGET', KEYS[i], unpack(ARGV))
end
return out
