-- read.lua: what a step of one partition starts from, in one call (read only; every key is in
-- the partition's slot: the due customers' keys are the prefix ARGV[3] plus their id).
--
-- KEYS[1]      meta hash of the partition     KEYS[2] due sorted set (customer -> due ms)
-- ARGV[1]      hint: an event time (epoch ms) the step may reach, or ''
-- ARGV[2]      at most this many due customers    ARGV[3] customer key prefix
-- ARGV[4]      JSON array of the ids of the customers the batch names (their stored values)
--
-- Due customers are those whose due time is <= max(asof, wm, hint): the furthest the step's
-- as-of time can go. They come in (due, id) order, at most ARGV[2] of them.
-- Returns {{offset, wm, asof, thr, seq, seen, tok}, {id1, due1, id2, due2, ...},
--          {value of each ARGV[4] customer}, {value of each due customer}}
-- (a customer with no stored value is false)

local meta = redis.call('HMGET', KEYS[1], 'offset', 'wm', 'asof', 'thr', 'seq', 'seen', 'tok')
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
-- MGET in chunks (unpack has a limit on how many values it returns)
local function mget(keys, first)
  local out = {}
  for i = first, #keys, 1000 do
    local part = redis.call('MGET', unpack(keys, i, math.min(i + 999, #keys)))
    for _, v in ipairs(part) do out[#out + 1] = v end
  end
  return out
end
local due_keys = {}
for i = 1, #due, 2 do due_keys[#due_keys + 1] = ARGV[3] .. due[i] end
local named_keys = {}
for _, id in ipairs(cjson.decode(ARGV[4])) do named_keys[#named_keys + 1] = ARGV[3] .. id end
return {meta, due, mget(named_keys, 1), mget(due_keys, 1)}
