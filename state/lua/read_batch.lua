-- read_batch.lua: what a batch of one partition starts from, in one call (read only; all
-- keys in the partition's slot).
--
-- KEYS[1]      meta hash of the partition
-- KEYS[2 ..]   3 keys per customer: state hash, event-id list, order-id list
-- Returns {offset, wm, thr, then per customer: {7 fields}, {event ids}, {order ids}}
--         (false where absent)

local meta = redis.call('HMGET', KEYS[1], 'offset', 'wm', 'thr')
local out = {meta[1], meta[2], meta[3]}
for k = 2, #KEYS, 3 do
  out[#out + 1] = redis.call('HMGET', KEYS[k], 'f', 'buy', 'ref', 'last', 'first', 'seg', 'cl')
  out[#out + 1] = redis.call('LRANGE', KEYS[k + 1], 0, -1)
  out[#out + 1] = redis.call('LRANGE', KEYS[k + 2], 0, -1)
end
return out
