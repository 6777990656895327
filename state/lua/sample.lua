-- sample.lua: the population values of the customers at given ranks of one partition's
-- z:last sorted set (ascending last purchase, then id), for the trainer's sample.
-- KEYS[1] z:last  KEYS[2] z:freq  KEYS[3] z:mon      ARGV ranks (0-based, within z:last)
-- Returns {last1, freq1, mon1, last2, ...} as strings, one triple per rank (in ARGV order);
-- false, false, false for a rank the population no longer has (an erasure since its size
-- was read).
local out = {}
for i = 1, #ARGV do
  local r = tonumber(ARGV[i])
  local row = redis.call('ZRANGE', KEYS[1], r, r, 'WITHSCORES')
  local member = row[1]
  if member then
    out[#out + 1] = row[2]
    out[#out + 1] = redis.call('ZSCORE', KEYS[2], member)
    out[#out + 1] = redis.call('ZSCORE', KEYS[3], member)
  else
    out[#out + 1] = false; out[#out + 1] = false; out[#out + 1] = false
  end
end
return out
