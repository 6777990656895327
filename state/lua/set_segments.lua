-- set_segments.lua: compare-and-set each customer's stored segment and cluster.
--
-- KEYS[1]           segcount hash of the partition (segment name -> customers)
-- KEYS[1 + i]       customer i's state hash
-- ARGV              4 values per customer: expected segment, expected cluster,
--                   new segment, new cluster ("" = none)
-- Returns           per customer 1 (written) or 0 (the stored value was not the expected one:
--                   another writer got there first; nothing written)

local out = {}
for i = 1, #KEYS - 1 do
  local k = KEYS[1 + i]
  local a = 1 + 4 * (i - 1)
  local v = redis.call('HMGET', k, 'seg', 'cl')
  local seg, cl = v[1] or '', v[2] or ''
  if seg == ARGV[a] and cl == ARGV[a + 1] then
    redis.call('HSET', k, 'seg', ARGV[a + 2], 'cl', ARGV[a + 3])
    if seg ~= ARGV[a + 2] then
      if seg ~= '' then redis.call('HINCRBY', KEYS[1], seg, -1) end
      redis.call('HINCRBY', KEYS[1], ARGV[a + 2], 1)
    end
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
