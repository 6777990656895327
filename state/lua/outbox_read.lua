-- outbox_read.lua: the fence of a partition's outbox reader; the caller sends it in one
-- MULTI with the XRANGE of the outbox (RedisStore.outbox_read), so the entries are read only
-- by the partition's publisher. (XRANGE's reply is not passed through Lua: converting ~1,000
-- entries to Lua values and back cost Redis ~3 ms a call, five times the XRANGE itself.)
-- The publisher is the meta field 'pub': the token the partition's latest owner claimed when
-- it was assigned the partition (HSET, RedisStore.outbox_claim). A worker that lost the
-- partition without knowing it yet (a rebalance it has not seen) reads nothing from then on.
-- An absent field (Redis lost or wiped it) is claimed by the reader.
--
-- KEYS[1] meta
-- ARGV[1] the reader's token
-- Returns 1.  Errors "FENCED <token>" when another token holds the partition (the caller
-- discards the XRANGE of that MULTI).

local holder = redis.call('HGET', KEYS[1], 'pub')
if not holder then
  redis.call('HSET', KEYS[1], 'pub', ARGV[1])
elseif holder ~= ARGV[1] then
  return redis.error_reply('FENCED ' .. holder)
end
return 1
