-- read.lua: where a step of one partition starts from, in one call (read only; both keys are
-- in the partition's slot): the partition's meta fields and its due customers. The customers'
-- values are read by MGETs beside it (RedisStore.read_partition), not through Lua: passing
-- ~1,000 values through Lua cost Redis ~2 ms a step, four times the MGET itself.
--
-- KEYS[1]      meta hash of the partition     KEYS[2] due sorted set (customer -> due ms)
-- ARGV[1]      hint: an event time (epoch ms) the step may reach, or ''
-- ARGV[2]      at most this many due customers
--
-- Due customers are those whose due time is <= max(asof, wm, hint): the furthest the step's
-- as-of time can go. They come in (due, id) order, at most ARGV[2] of them.
-- Returns {{offset, wm, asof, thr, seq, seen, tok, rules}, {id1, due1, id2, due2, ...}}

local meta = redis.call('HMGET', KEYS[1], 'offset', 'wm', 'asof', 'thr', 'seq', 'seen', 'tok',
                        'rules')
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
return {meta, due}
