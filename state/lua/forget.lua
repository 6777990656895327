-- forget.lua: erase one customer from its partition (a data-protection request), atomically:
-- the state hash, the population sorted sets, the due set and the per-segment count. The
-- partition's commit sequence moves on, so a step computed before the erasure cannot write
-- the customer back (its compare-and-set fails and it re-reads).
-- KEYS[1] meta  KEYS[2] z:last  KEYS[3] z:freq  KEYS[4] z:mon  KEYS[5] due  KEYS[6] segcount
-- KEYS[7] the customer's hash      ARGV[1] customer id
-- Returns 1 when the customer existed, else 0.
local seg = redis.call('HGET', KEYS[7], 'seg')
local existed = redis.call('DEL', KEYS[7])
for k = 2, 5 do redis.call('ZREM', KEYS[k], ARGV[1]) end
if seg and seg ~= '' then redis.call('HINCRBY', KEYS[6], seg, -1) end
redis.call('HINCRBY', KEYS[1], 'seq', 1)
return existed
