-- read.lua: what a step of one partition starts from, in one call (read only; every key is in
-- the partition's slot: the due customers' hashes are the prefix ARGV[3] plus their id).
--
-- KEYS[1]      meta hash of the partition     KEYS[2] due sorted set (customer -> due ms)
-- KEYS[3 ..]   the hashes of the customers the batch names
-- ARGV[1]      hint: an event time (epoch ms) the step may reach, or ''
-- ARGV[2]      at most this many due customers    ARGV[3] customer key prefix
-- ARGV[4 ..]   the customer hash fields to return, in order
--
-- Due customers are those whose due time is <= max(asof, wm, hint): the furthest the step's
-- as-of time can go. They come in (due, id) order, at most ARGV[2] of them.
-- Returns {{offset, wm, asof, thr, seq, seen}, {id1, due1, id2, due2, ...},
--          fields of each KEYS[3..] customer, fields of each due customer}

local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
local meta = redis.call('HMGET', KEYS[1], 'offset', 'wm', 'asof', 'thr', 'seq', 'seen')
local upper = nil
for _, v in ipairs({meta[2], meta[3], ARGV[1]}) do
  local x = tonumber(v or '')
  if x ~= nil and (upper == nil or x > upper) then upper = x end
end
local due = {}
if upper ~= nil then
  due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', string.format('%.0f', upper),
                   'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
end
local out = {meta, due}
for k = 3, #KEYS do
  out[#out + 1] = redis.call('HMGET', KEYS[k], unpack(fields))
end
for i = 1, #due, 2 do
  out[#out + 1] = redis.call('HMGET', ARGV[3] .. due[i], unpack(fields))
end
return out
