-- set_thresholds.lua: store a partition's scoring thresholds (JSON) if the partition's applied
-- offset is still the one they were computed at (compare-and-set).
--
-- KEYS[1]  meta hash of the partition
-- ARGV[1]  expected offset (-1 when none)    ARGV[2] thresholds JSON
-- Returns  1 when written, 0 when the stored offset differs (nothing written)

local stored = tonumber(redis.call('HGET', KEYS[1], 'offset') or '-1')
if stored ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'thr', ARGV[2])
return 1
