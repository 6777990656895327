-- count_worse.lua: population counts of one partition for RFM scoring.
-- Readers sum the answers of every partition (DESIGN.md, "Scaling out").
--
-- KEYS[1] z:last   KEYS[2] z:freq   KEYS[3] z:mon   (one partition's population sorted sets)
-- ARGV    3 values per customer to score:
--           recency bound (epoch ms): customers whose last purchase is <= it have a strictly
--                                     larger recency in whole days (worse)
--           frequency, monetary (minor units): customers strictly below them are worse
-- Returns {population, then per customer: worse_r, worse_f, worse_m}

local out = {redis.call('ZCARD', KEYS[1])}
for i = 1, #ARGV, 3 do
  out[#out + 1] = redis.call('ZCOUNT', KEYS[1], '-inf', ARGV[i])
  out[#out + 1] = redis.call('ZCOUNT', KEYS[2], '-inf', '(' .. ARGV[i + 1])
  out[#out + 1] = redis.call('ZCOUNT', KEYS[3], '-inf', '(' .. ARGV[i + 2])
end
return out
