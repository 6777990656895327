-- outbox_read.lua: the oldest outbox entries of a partition, for the partition's publisher
-- only (fencing). The publisher is the meta field 'pub': the token the partition's latest
-- owner claimed when it was assigned the partition (HSET, RedisStore.outbox_claim). A worker
-- that lost the partition without knowing it yet (a rebalance it has not seen) reads nothing
-- from then on. An absent field (Redis lost or wiped it) is claimed by the reader.
--
-- KEYS[1] meta  KEYS[2] outbox
-- ARGV[1] the reader's token   ARGV[2] at most this many entries
-- Returns XRANGE's reply {{id, {field, value, ...}}, ...}, oldest first.
-- Errors "FENCED <token>" when another token holds the partition; nothing is read.

local holder = redis.call('HGET', KEYS[1], 'pub')
if not holder then
  redis.call('HSET', KEYS[1], 'pub', ARGV[1])
elseif holder ~= ARGV[1] then
  return redis.error_reply('FENCED ' .. holder)
end
return redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', ARGV[2])
