-- counts.lua: how many of one partition's customers have a population value <= each bound
-- (read only), for the order-statistics search of the scoring thresholds.
-- KEYS[1] z:last  KEYS[2] z:freq  KEYS[3] z:mon
-- ARGV pairs: kind (1 last, 2 freq, 3 mon), upper bound (inclusive)
-- Returns {count1, count2, ...} in ARGV order.
local out = {}
for i = 1, #ARGV, 2 do
  out[#out + 1] = redis.call('ZCOUNT', KEYS[tonumber(ARGV[i])], '-inf', ARGV[i + 1])
end
return out
