-- between.lua: the customers of one partition whose population value lies in any of the
-- given closed ranges, with their three population values.
-- KEYS[1] z:last  KEYS[2] z:freq  KEYS[3] z:mon
-- ARGV triples: kind (1 last, 2 freq, 3 mon), low, high ('-inf' / '+inf' allowed)
-- Returns {{id1, id2, ...}, {last1, freq1, mon1, last2, ...}} (values as integers), ids in
-- first-found order, each once (only customers present in all three sets).
local seen, ids = {}, {}
for i = 1, #ARGV, 3 do
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2])) do
    if not seen[m] then seen[m] = true; ids[#ids + 1] = m end
  end
end
local out, values = {}, {}
for i = 1, #ids, 1000 do
  local part = {unpack(ids, i, math.min(i + 999, #ids))}
  local cols = {}
  for k = 1, 3 do cols[k] = redis.call('ZMSCORE', KEYS[k], unpack(part)) end
  for j = 1, #part do
    if cols[1][j] and cols[2][j] and cols[3][j] then  -- scored: in all three sets
      out[#out + 1] = part[j]
      for k = 1, 3 do values[#values + 1] = tonumber(cols[k][j]) end
    end
  end
end
return {out, values}
